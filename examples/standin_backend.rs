//! A stand-in chat backend: drives the backend API as a Wire-style backend would,
//! so an operator can chat with a real XMPP user through xmpp-federator.
//!
//! ```sh
//! cargo run --example standin_backend -- --api 127.0.0.1:8080 --token TOKEN \
//!     --user u1 --handle alice --name "Alice Example"
//! ```
//!
//! It registers (or updates) the user, prints every inbound event (messages,
//! delivery outcomes) and acknowledges it, and reads commands from stdin:
//!
//! ```text
//! /to romeo@example.org      choose the recipient
//! /whois romeo@example.org   look a remote user up (exists? display name, stable id)
//! anything else              sent as a message to the recipient
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use xmpp_federator_testkit::http::try_request;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn describe(e: &serde_json::Value) -> String {
    match e["type"].as_str().unwrap_or("") {
        "message" => format!(
            "message from {}: {}",
            e["from"].as_str().unwrap_or("?"),
            e["body"].as_str().unwrap_or("(no body)")
        ),
        "delivered" => format!(
            "delivered {} to {}",
            e["id"].as_str().unwrap_or("?"),
            e["to"].as_str().unwrap_or("?")
        ),
        "bounced" => format!(
            "bounced {} from {}: {} {}",
            e["id"].as_str().unwrap_or("?"),
            e["to"].as_str().unwrap_or("?"),
            e["condition"].as_str().unwrap_or("?"),
            e["text"].as_str().unwrap_or("")
        ),
        "expired" => format!(
            "expired {} to {}",
            e["id"].as_str().unwrap_or("?"),
            e["to"].as_str().unwrap_or("?")
        ),
        other => format!("{other}: {e}"),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let api: SocketAddr = arg("--api")
        .unwrap_or_else(|| "127.0.0.1:8080".into())
        .parse()?;
    let token = arg("--token").ok_or("--token is required (the server logs a generated one)")?;
    let user = arg("--user").unwrap_or_else(|| "u1".into());
    let handle = arg("--handle").unwrap_or_else(|| "alice".into());
    let name = arg("--name").unwrap_or_else(|| handle.clone());

    let body = json!({"handle": handle, "display_name": name}).to_string();
    let (s, b, _) = try_request(
        api,
        "PUT",
        &format!("/v1/users/{user}"),
        Some(&token),
        Some(&body),
    )
    .await?;
    if s >= 300 {
        return Err(format!("registering the user failed: {s} {b}").into());
    }
    println!(
        "logged in as {} (user id {user})",
        b["jid"].as_str().unwrap_or("?")
    );

    let t = token.clone();
    tokio::spawn(async move {
        loop {
            match try_request(api, "GET", "/v1/events?wait=25", Some(&t), None).await {
                Ok((200, b, _)) => {
                    let evs = b["events"].as_array().cloned().unwrap_or_default();
                    for e in &evs {
                        println!("<< {}", describe(e));
                    }
                    if !evs.is_empty() {
                        let ack = json!({"up_to": b["cursor"]}).to_string();
                        let _ =
                            try_request(api, "POST", "/v1/events/ack", Some(&t), Some(&ack)).await;
                    }
                }
                Ok((s, b, _)) => {
                    eprintln!("events: {s} {b}");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                Err(e) => {
                    eprintln!("events: {e}");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        }
    });

    let mut to: Option<String> = None;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let line = line.trim();
        if let Some(j) = line.strip_prefix("/to ") {
            to = Some(j.trim().to_string());
            println!("now talking to {}", j.trim());
        } else if let Some(j) = line.strip_prefix("/whois ") {
            match try_request(
                api,
                "GET",
                &format!("/v1/remote/{}", j.trim()),
                Some(&token),
                None,
            )
            .await
            {
                Ok((_, b, _)) => println!("{b}"),
                Err(e) => eprintln!("{e}"),
            }
        } else if !line.is_empty() {
            let Some(jid) = &to else {
                println!("choose a recipient first: /to user@example.org");
                continue;
            };
            let body = json!({"from": user, "to": jid, "body": line}).to_string();
            match try_request(api, "POST", "/v1/messages", Some(&token), Some(&body)).await {
                Ok((202, b, _)) => println!(">> queued {}", b["id"].as_str().unwrap_or("?")),
                Ok((s, b, _)) => println!("refused ({s}): {}", b["detail"].as_str().unwrap_or("")),
                Err(e) => eprintln!("{e}"),
            }
        }
    }
    Ok(())
}
