//! Writing XML: escaping and a tiny builder for the stanzas we originate.
//!
//! We only ever write stanzas we build ourselves (replies, errors, negotiation
//! elements); forwarded stanzas keep their validated raw bytes.

use std::borrow::Cow;

/// Escape text or an attribute value (`<`, `>`, `&`, `'`, `"`).
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s
        .bytes()
        .any(|b| matches!(b, b'<' | b'>' | b'&' | b'\'' | b'"'))
    {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Builds one element as a string. Attributes whose value is `None` are skipped.
///
/// ```
/// use xmpp_federator::xml::writer::ElementBuilder;
/// let xml = ElementBuilder::new("iq")
///     .attr("type", Some("result"))
///     .attr("id", Some("a&b"))
///     .empty();
/// assert_eq!(xml, "<iq type='result' id='a&amp;b'/>");
/// ```
#[derive(Debug)]
pub struct ElementBuilder {
    name: &'static str,
    out: String,
}

impl ElementBuilder {
    /// Start `<name`.
    pub fn new(name: &'static str) -> Self {
        let mut out = String::with_capacity(128);
        out.push('<');
        out.push_str(name);
        ElementBuilder { name, out }
    }

    /// Add an attribute if `value` is `Some`.
    pub fn attr(mut self, key: &str, value: Option<&str>) -> Self {
        // Pushed, not `write!`: the formatting machinery was a visible part of
        // every iq answer's cost in `perf`.
        if let Some(v) = value {
            let v = escape(v);
            self.out.reserve(key.len() + v.len() + 4);
            self.out.push(' ');
            self.out.push_str(key);
            self.out.push_str("='");
            self.out.push_str(&v);
            self.out.push('\'');
        }
        self
    }

    /// Close as an empty element.
    pub fn empty(mut self) -> String {
        self.out.push_str("/>");
        self.out
    }

    /// Close with already-serialized children.
    pub fn children(mut self, inner: &str) -> String {
        self.out.reserve(inner.len() + self.name.len() + 4);
        self.out.push('>');
        self.out.push_str(inner);
        self.out.push_str("</");
        self.out.push_str(self.name);
        self.out.push('>');
        self.out
    }

    /// Close with escaped text content.
    pub fn text(self, text: &str) -> String {
        let t = escape(text);
        self.children(&t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_all_five() {
        assert_eq!(escape("<a'&\">"), "&lt;a&apos;&amp;&quot;&gt;");
        assert!(matches!(escape("plain"), Cow::Borrowed(_)));
    }

    #[test]
    fn builder_children_and_text() {
        let x = ElementBuilder::new("body").text("1 < 2");
        assert_eq!(x, "<body>1 &lt; 2</body>");
        let y = ElementBuilder::new("q").attr("a", None).children("<x/>");
        assert_eq!(y, "<q><x/></q>");
    }
}
