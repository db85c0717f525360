//! NOTIFICATION codes and the errors the decoder reports (RFC 4271 §4.5, §6; RFC 7606). Pure.

use std::fmt;

/// Error codes (RFC 4271 §4.5).
pub mod code {
    pub const HEADER: u8 = 1;
    pub const OPEN: u8 = 2;
    pub const UPDATE: u8 = 3;
    pub const HOLD_TIMER_EXPIRED: u8 = 4;
    pub const FSM: u8 = 5;
    pub const CEASE: u8 = 6;
    pub const ROUTE_REFRESH: u8 = 7;
    /// RFC 9687: the peer did not take what we sent for the send hold time.
    pub const SEND_HOLD_TIMER_EXPIRED: u8 = 8;
}

/// Subcodes (RFC 4271 §6.1–6.3, RFC 4486 for Cease, RFC 5492 for capabilities).
pub mod subcode {
    // Message Header Error
    pub const CONNECTION_NOT_SYNCHRONIZED: u8 = 1;
    pub const BAD_MESSAGE_LENGTH: u8 = 2;
    pub const BAD_MESSAGE_TYPE: u8 = 3;
    // OPEN Message Error
    pub const UNSPECIFIC: u8 = 0;
    pub const UNSUPPORTED_VERSION: u8 = 1;
    pub const BAD_PEER_AS: u8 = 2;
    pub const BAD_BGP_IDENTIFIER: u8 = 3;
    pub const UNSUPPORTED_OPTIONAL_PARAMETER: u8 = 4;
    pub const UNACCEPTABLE_HOLD_TIME: u8 = 6;
    pub const UNSUPPORTED_CAPABILITY: u8 = 7;
    // UPDATE Message Error
    pub const MALFORMED_ATTRIBUTE_LIST: u8 = 1;
    pub const UNRECOGNIZED_WELL_KNOWN: u8 = 2;
    pub const MISSING_WELL_KNOWN: u8 = 3;
    pub const ATTRIBUTE_FLAGS_ERROR: u8 = 4;
    pub const ATTRIBUTE_LENGTH_ERROR: u8 = 5;
    pub const INVALID_ORIGIN: u8 = 6;
    pub const INVALID_NEXT_HOP: u8 = 8;
    pub const OPTIONAL_ATTRIBUTE_ERROR: u8 = 9;
    pub const INVALID_NETWORK_FIELD: u8 = 10;
    pub const MALFORMED_AS_PATH: u8 = 11;
    // Cease (RFC 4486)
    pub const MAX_PREFIXES: u8 = 1;
    pub const ADMIN_SHUTDOWN: u8 = 2;
    pub const PEER_DECONFIGURED: u8 = 3;
    pub const ADMIN_RESET: u8 = 4;
    pub const CONNECTION_REJECTED: u8 = 5;
    pub const OTHER_CONFIGURATION_CHANGE: u8 = 6;
    pub const CONNECTION_COLLISION: u8 = 7;
    pub const OUT_OF_RESOURCES: u8 = 8;
}

/// A NOTIFICATION message: what went wrong, per RFC 4271 §4.5.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Notification {
    pub code: u8,
    pub subcode: u8,
    pub data: Vec<u8>,
}

impl Notification {
    pub fn new(code: u8, subcode: u8, data: impl Into<Vec<u8>>) -> Notification {
        Notification {
            code,
            subcode,
            data: data.into(),
        }
    }

    /// Cease / Maximum Number of Prefixes Reached with the data RFC 4486 §4 describes: the
    /// address family (AFI, SAFI) and the upper bound.
    pub fn max_prefixes(afi: u16, safi: u8, limit: u32) -> Notification {
        let mut data = afi.to_be_bytes().to_vec();
        data.push(safi);
        data.extend(limit.to_be_bytes());
        Notification::new(code::CEASE, subcode::MAX_PREFIXES, data)
    }

    /// A short name for the code/subcode pair, as operators know them.
    pub fn describe(&self) -> String {
        let c = match self.code {
            code::HEADER => "message header error",
            code::OPEN => "OPEN message error",
            code::UPDATE => "UPDATE message error",
            code::HOLD_TIMER_EXPIRED => "hold timer expired",
            code::FSM => "finite state machine error",
            code::CEASE => "cease",
            code::ROUTE_REFRESH => "ROUTE-REFRESH message error",
            code::SEND_HOLD_TIMER_EXPIRED => "send hold timer expired",
            _ => "unknown error code",
        };
        let s = match (self.code, self.subcode) {
            (code::HEADER, 1) => "connection not synchronized",
            (code::HEADER, 2) => "bad message length",
            (code::HEADER, 3) => "bad message type",
            (code::OPEN, 1) => "unsupported version number",
            (code::OPEN, 2) => "bad peer AS",
            (code::OPEN, 3) => "bad BGP identifier",
            (code::OPEN, 4) => "unsupported optional parameter",
            (code::OPEN, 6) => "unacceptable hold time",
            (code::OPEN, 7) => "unsupported capability",
            (code::UPDATE, 1) => "malformed attribute list",
            (code::UPDATE, 2) => "unrecognized well-known attribute",
            (code::UPDATE, 3) => "missing well-known attribute",
            (code::UPDATE, 4) => "attribute flags error",
            (code::UPDATE, 5) => "attribute length error",
            (code::UPDATE, 6) => "invalid ORIGIN attribute",
            (code::UPDATE, 8) => "invalid NEXT_HOP attribute",
            (code::UPDATE, 9) => "optional attribute error",
            (code::UPDATE, 10) => "invalid network field",
            (code::UPDATE, 11) => "malformed AS_PATH",
            (code::CEASE, 1) => "maximum number of prefixes reached",
            (code::CEASE, 2) => "administrative shutdown",
            (code::CEASE, 3) => "peer de-configured",
            (code::CEASE, 4) => "administrative reset",
            (code::CEASE, 5) => "connection rejected",
            (code::CEASE, 6) => "other configuration change",
            (code::CEASE, 7) => "connection collision resolution",
            (code::CEASE, 8) => "out of resources",
            (_, 0) => "",
            _ => "unknown subcode",
        };
        if s.is_empty() {
            format!("{c} ({}/{})", self.code, self.subcode)
        } else {
            format!("{c}: {s} ({}/{})", self.code, self.subcode)
        }
    }
}

impl fmt::Display for Notification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Why bytes from a peer could not be taken as a message. Every variant maps to the
/// NOTIFICATION that must be sent before the session is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The message is invalid and the session must be reset with this NOTIFICATION.
    #[error("{reason}: {notification}")]
    Fatal {
        notification: Notification,
        reason: String,
    },
}

impl DecodeError {
    pub fn fatal(
        code: u8,
        subcode: u8,
        data: impl Into<Vec<u8>>,
        reason: impl Into<String>,
    ) -> Self {
        DecodeError::Fatal {
            notification: Notification::new(code, subcode, data),
            reason: reason.into(),
        }
    }

    /// The NOTIFICATION to send.
    pub fn notification(&self) -> &Notification {
        match self {
            DecodeError::Fatal { notification, .. } => notification,
        }
    }
}

/// Why routes could not be packed into UPDATE messages for sending.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The path attributes alone leave no room for a prefix within the message size (a path
    /// with thousands of communities, say): these routes cannot be announced to this peer.
    #[error("path attributes of {attrs_len} bytes leave no room for a prefix in a {max_len}-byte UPDATE")]
    AttributesTooLarge { attrs_len: usize, max_len: usize },
}
