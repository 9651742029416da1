//! A minimal HTTP/1.1 client for tests and tools (one request per connection), so
//! they need no HTTP client crate.

/// A minimal HTTP/1.1 exchange (Connection: close); returns (status, body as JSON or
/// `Null`, content-type).
pub async fn request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, serde_json::Value, String) {
    try_request(addr, method, path, token, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// Like [`request`], with transport errors returned instead of panicking.
pub async fn try_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Result<(u16, serde_json::Value, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let e = |e: std::io::Error| e.to_string();
    let mut tcp = tokio::net::TcpStream::connect(addr).await.map_err(e)?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || method == "POST" || method == "PUT" {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    tcp.write_all(req.as_bytes()).await.map_err(e)?;
    tcp.write_all(body.as_bytes()).await.map_err(e)?;
    let mut out = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        tcp.read_to_end(&mut out),
    )
    .await
    .map_err(|_| "no HTTP answer within 30 s".to_string())?
    .map_err(e)?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {head:.80}"))?;
    let ctype = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let payload = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    let json = serde_json::from_str(&payload).unwrap_or(serde_json::Value::Null);
    Ok((status, json, ctype))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// GET a text resource (e.g. `/metrics`); returns the status and the body.
pub async fn get_text(addr: std::net::SocketAddr, path: &str) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let e = |e: std::io::Error| e.to_string();
    let mut tcp = tokio::net::TcpStream::connect(addr).await.map_err(e)?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.map_err(e)?;
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.map_err(e)?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {head:.80}"))?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, body))
}

/// Every event in the queue (not acknowledging any), paging through
/// `GET /v1/events`; stops at the first error.
pub async fn all_events(api: std::net::SocketAddr, token: &str) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let path = format!("/v1/events?after={after}&limit=1000");
        let Ok((200, b, _)) = try_request(api, "GET", &path, Some(token), None).await else {
            break;
        };
        let evs = b["events"].as_array().cloned().unwrap_or_default();
        if evs.is_empty() {
            break;
        }
        after = b["cursor"].as_u64().unwrap_or(after);
        out.extend(evs);
    }
    out
}
