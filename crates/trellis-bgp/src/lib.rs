//! BGP-4 for Trellis, as pure code (sans-IO): [`message`] and [`attrs`] encode and decode the
//! wire format (RFC 4271, 4760, 6793, 2918, 4724, 1997, 4456) with RFC 7606 error handling,
//! [`fsm`] is the session state machine with time passed in, [`rib`] holds the RIBs, the
//! decision process and route reflection, and [`policy`] the per-peer route filters, [`restart`] the graceful restart decisions. The agent's speaker is the shell around them.

pub mod attrs;
pub mod error;
pub mod fsm;
pub mod message;
pub mod nlri;
pub mod policy;
pub mod restart;
pub mod rib;

pub use attrs::{AsPath, AsSegment, Context, Origin, PathAttrs, SegmentKind};
pub use error::{DecodeError, Notification};
pub use fsm::{Fsm, Input, Negotiated, Output, SessionConfig, State};
pub use message::{Capability, Message, Open, Update};
pub use rib::{
    Installed, LimitAction, NextHopMode, Outbound, PeerId, PeerInfo, PrefixLimit, Rib, RibConfig,
};
