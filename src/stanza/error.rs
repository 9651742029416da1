//! Stream and stanza error conditions, in the order RFC 6120 lists them.

use crate::xml::writer::escape;
use crate::xml::{NS_STREAMS_ERR, XmlError};

macro_rules! conditions {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $var:ident = $s:literal),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum $name { $($(#[$vm])* $var),* }
        impl $name {
            /// The element name of the condition.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$var => $s),* }
            }
            /// Parse an element name.
            pub fn from_name(s: &str) -> Option<Self> {
                match s { $($s => Some($name::$var),)* _ => None }
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

conditions! {
    /// Stream error conditions (RFC 6120 §4.9.3).
    StreamCondition {
        /// §4.9.3.1
        BadFormat = "bad-format",
        /// §4.9.3.2
        BadNamespacePrefix = "bad-namespace-prefix",
        /// §4.9.3.3
        Conflict = "conflict",
        /// §4.9.3.4
        ConnectionTimeout = "connection-timeout",
        /// §4.9.3.5
        HostGone = "host-gone",
        /// §4.9.3.6
        HostUnknown = "host-unknown",
        /// §4.9.3.7
        ImproperAddressing = "improper-addressing",
        /// §4.9.3.8
        InternalServerError = "internal-server-error",
        /// §4.9.3.9
        InvalidFrom = "invalid-from",
        /// §4.9.3.10
        InvalidNamespace = "invalid-namespace",
        /// §4.9.3.11
        InvalidXml = "invalid-xml",
        /// §4.9.3.12
        NotAuthorized = "not-authorized",
        /// §4.9.3.13
        NotWellFormed = "not-well-formed",
        /// §4.9.3.14
        PolicyViolation = "policy-violation",
        /// §4.9.3.15
        RemoteConnectionFailed = "remote-connection-failed",
        /// §4.9.3.16
        Reset = "reset",
        /// §4.9.3.17
        ResourceConstraint = "resource-constraint",
        /// §4.9.3.18
        RestrictedXml = "restricted-xml",
        /// §4.9.3.19
        SeeOtherHost = "see-other-host",
        /// §4.9.3.20
        SystemShutdown = "system-shutdown",
        /// §4.9.3.21
        UndefinedCondition = "undefined-condition",
        /// §4.9.3.22
        UnsupportedEncoding = "unsupported-encoding",
        /// §4.9.3.23
        UnsupportedFeature = "unsupported-feature",
        /// §4.9.3.24
        UnsupportedStanzaType = "unsupported-stanza-type",
        /// §4.9.3.25
        UnsupportedVersion = "unsupported-version",
    }
}

conditions! {
    /// Stanza error conditions (RFC 6120 §8.3.3).
    StanzaCondition {
        /// §8.3.3.1
        BadRequest = "bad-request",
        /// §8.3.3.2
        Conflict = "conflict",
        /// §8.3.3.3
        FeatureNotImplemented = "feature-not-implemented",
        /// §8.3.3.4
        Forbidden = "forbidden",
        /// §8.3.3.5
        Gone = "gone",
        /// §8.3.3.6
        InternalServerError = "internal-server-error",
        /// §8.3.3.7
        ItemNotFound = "item-not-found",
        /// §8.3.3.8
        JidMalformed = "jid-malformed",
        /// §8.3.3.9
        NotAcceptable = "not-acceptable",
        /// §8.3.3.10
        NotAllowed = "not-allowed",
        /// §8.3.3.11
        NotAuthorized = "not-authorized",
        /// §8.3.3.12
        PolicyViolation = "policy-violation",
        /// §8.3.3.13
        RecipientUnavailable = "recipient-unavailable",
        /// §8.3.3.14
        Redirect = "redirect",
        /// §8.3.3.15
        RegistrationRequired = "registration-required",
        /// §8.3.3.16
        RemoteServerNotFound = "remote-server-not-found",
        /// §8.3.3.17
        RemoteServerTimeout = "remote-server-timeout",
        /// §8.3.3.18
        ResourceConstraint = "resource-constraint",
        /// §8.3.3.19
        ServiceUnavailable = "service-unavailable",
        /// §8.3.3.20
        SubscriptionRequired = "subscription-required",
        /// §8.3.3.21
        UndefinedCondition = "undefined-condition",
        /// §8.3.3.22
        UnexpectedRequest = "unexpected-request",
    }
}

/// The `type` of a stanza error (RFC 6120 §8.3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StanzaErrorType {
    /// Retry after providing credentials.
    Auth,
    /// Do not retry.
    Cancel,
    /// Proceed; the condition was only a warning.
    Continue,
    /// Retry after changing the data sent.
    Modify,
    /// Retry after waiting.
    Wait,
}

impl StanzaErrorType {
    /// The attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            StanzaErrorType::Auth => "auth",
            StanzaErrorType::Cancel => "cancel",
            StanzaErrorType::Continue => "continue",
            StanzaErrorType::Modify => "modify",
            StanzaErrorType::Wait => "wait",
        }
    }
}

impl StanzaCondition {
    /// The usual error type for the condition (RFC 6120 §8.3.3 examples).
    pub fn error_type(self) -> StanzaErrorType {
        use StanzaCondition::*;
        match self {
            BadRequest | JidMalformed | NotAcceptable | PolicyViolation | Redirect => {
                StanzaErrorType::Modify
            }
            Forbidden | NotAuthorized | RegistrationRequired | SubscriptionRequired => {
                StanzaErrorType::Auth
            }
            RecipientUnavailable | RemoteServerTimeout | ResourceConstraint
            | InternalServerError => StanzaErrorType::Wait,
            UnexpectedRequest => StanzaErrorType::Wait,
            _ => StanzaErrorType::Cancel,
        }
    }
}

impl From<&XmlError> for StreamCondition {
    fn from(e: &XmlError) -> Self {
        match e {
            XmlError::BadNamespacePrefix(_) => StreamCondition::BadNamespacePrefix,
            XmlError::InvalidNamespace(_) => StreamCondition::InvalidNamespace,
            XmlError::InvalidXml(_) => StreamCondition::InvalidXml,
            XmlError::NotWellFormed(_) => StreamCondition::NotWellFormed,
            XmlError::PolicyViolation(_) => StreamCondition::PolicyViolation,
            XmlError::RestrictedXml(_) => StreamCondition::RestrictedXml,
            XmlError::UnsupportedEncoding => StreamCondition::UnsupportedEncoding,
        }
    }
}

/// Serialize `<stream:error>` with an optional explanation (RFC 6120 §4.9.2).
pub fn stream_error_xml(condition: StreamCondition, text: Option<&str>) -> String {
    let mut s = format!(
        "<stream:error><{} xmlns='{NS_STREAMS_ERR}'/>",
        condition.as_str()
    );
    if let Some(t) = text {
        s.push_str(&format!(
            "<text xmlns='{NS_STREAMS_ERR}' xml:lang='en'>{}</text>",
            escape(t)
        ));
    }
    s.push_str("</stream:error>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_names() {
        for c in [
            StreamCondition::BadFormat,
            StreamCondition::UnsupportedVersion,
            StreamCondition::InvalidFrom,
        ] {
            assert_eq!(StreamCondition::from_name(c.as_str()), Some(c));
        }
        for c in [
            StanzaCondition::BadRequest,
            StanzaCondition::UnexpectedRequest,
            StanzaCondition::RemoteServerNotFound,
        ] {
            assert_eq!(StanzaCondition::from_name(c.as_str()), Some(c));
        }
    }

    #[test]
    fn stream_error_serialization() {
        assert_eq!(
            stream_error_xml(StreamCondition::HostUnknown, Some("x<y")),
            "<stream:error><host-unknown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/><text xmlns='urn:ietf:params:xml:ns:xmpp-streams' xml:lang='en'>x&lt;y</text></stream:error>"
        );
    }
}
