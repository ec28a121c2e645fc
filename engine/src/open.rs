//! The request that opens a service on a host daemon (`livemig serve`), and its answer. A daemon exposes no memory at the
//! handshake (it cannot know what the peer wants); the peer's first message on the session
//! asks for a service and its memory, the daemon checks it against its limits, creates and
//! exposes the memory, and answers. From there the session goes on as with a one-shot
//! `receive` or bench listener.
//!
//! Both messages are one JSON object each (at most [`MAX_REQUEST`] bytes), versioned.

use serde::{Deserialize, Serialize};

/// Version of the request format.
pub const OPEN_VERSION: u32 = 1;
/// Largest request or reply.
pub const MAX_REQUEST: usize = 4096;

/// What a daemon can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Service {
    /// The destination of a memory migration (pre-copy, post-copy or hybrid).
    Receive,
    /// The sink of `bench pages`.
    BenchPages,
    /// The sink of `bench chunks` (file-backed).
    BenchChunks,
    /// A control request (`clone`, `commit`, `status`, …) for a disk the daemon serves,
    /// answered with one message; no memory is involved.
    DiskControl,
    /// The destination of a live disk transfer (`disk migrate`): the daemon keeps the disk
    /// under the name `disk` and serves it over NBD from the handover on.
    DiskReceive,
}

impl Service {
    /// Its name in requests and logs.
    pub fn name(self) -> &'static str {
        match self {
            Service::Receive => "receive",
            Service::BenchPages => "bench-pages",
            Service::BenchChunks => "bench-chunks",
            Service::DiskControl => "disk-control",
            Service::DiskReceive => "disk-receive",
        }
    }
}

/// The peer's request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenRequest {
    /// [`OPEN_VERSION`].
    pub version: u32,
    /// The service.
    pub service: Service,
    /// Bytes of memory (or disk) the service needs.
    pub size: u64,
    /// Page (chunk) size.
    pub page_size: u64,
    /// Receive: seconds to measure the resumed workload before reporting its rate.
    #[serde(default)]
    pub after_s: f64,
    /// DiskControl: the served disk's name (its `name` in the daemon's configuration).
    /// DiskReceive: the name the received disk gets (a file name: letters, digits, `.`, `_`,
    /// `-`, not starting with `.`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub disk: String,
    /// DiskControl: the request, as the disk's control socket takes it (one JSON value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<serde_json::Value>,
}

/// The daemon's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub enum OpenReply {
    /// The memory is exposed; the session id is the daemon's, for its logs.
    Opened {
        /// Daemon session number.
        session: u64,
    },
    /// Not served, and why.
    Refused {
        /// Why.
        reason: String,
    },
}

/// A request that cannot be served as sent.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum OpenError {
    /// Longer than [`MAX_REQUEST`].
    #[error("request of {0} bytes (at most {MAX_REQUEST})")]
    TooLong(usize),
    /// Not a request.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// Another version.
    #[error("request version {0} (this daemon speaks {OPEN_VERSION})")]
    Version(u32),
    /// Sizes that make no sense.
    #[error("size {size} is not a positive multiple of the page size {page_size} (a power of two, 512 B to 2 MiB)")]
    Sizes {
        /// Size.
        size: u64,
        /// Page size.
        page_size: u64,
    },
    /// A disk-control request without its disk or request, or with memory; or another
    /// service with them.
    #[error(
        "a disk-control request names a disk (at most 128 bytes) and a request, and no memory; other services neither"
    )]
    Control,
    /// A disk-receive request without a valid disk name, or with memory or a request.
    #[error(
        "a disk-receive request names the disk (1-128 letters, digits, '.', '_' or '-', not starting with '.') \
         and nothing else"
    )]
    Receive,
    /// `after_s` outside 0..=3600.
    #[error("after_s {0} must be between 0 and 3600")]
    After(f64),
}

impl OpenRequest {
    /// Encodes the request.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a request serialises")
    }

    /// Decodes and validates a request (pure; fuzzed).
    pub fn decode(b: &[u8]) -> Result<OpenRequest, OpenError> {
        if b.len() > MAX_REQUEST {
            return Err(OpenError::TooLong(b.len()));
        }
        let r: OpenRequest = serde_json::from_slice(b).map_err(|e| OpenError::Malformed(e.to_string()))?;
        if r.version != OPEN_VERSION {
            return Err(OpenError::Version(r.version));
        }
        if r.service == Service::DiskControl {
            if r.size != 0 || r.page_size != 0 || r.disk.is_empty() || r.disk.len() > 128 || r.request.is_none() {
                return Err(OpenError::Control);
            }
            return Ok(r);
        }
        if r.service == Service::DiskReceive {
            if r.size != 0 || r.page_size != 0 || r.request.is_some() || !is_disk_name(&r.disk) {
                return Err(OpenError::Receive);
            }
            return Ok(r);
        }
        if !r.disk.is_empty() || r.request.is_some() {
            return Err(OpenError::Control);
        }
        let ps_ok = r.page_size.is_power_of_two() && (512..=2 << 20).contains(&r.page_size);
        if !ps_ok || r.size == 0 || r.size % r.page_size != 0 {
            return Err(OpenError::Sizes { size: r.size, page_size: r.page_size });
        }
        if !(r.after_s.is_finite() && (0.0..=3600.0).contains(&r.after_s)) {
            return Err(OpenError::After(r.after_s));
        }
        Ok(r)
    }
}

/// A name a received disk may take: usable as a file name as it is.
pub fn is_disk_name(n: &str) -> bool {
    (1..=128).contains(&n.len())
        && !n.starts_with('.')
        && n.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl OpenReply {
    /// Encodes the reply.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a reply serialises")
    }

    /// Decodes a reply (pure; fuzzed).
    pub fn decode(b: &[u8]) -> Result<OpenReply, OpenError> {
        if b.len() > MAX_REQUEST {
            return Err(OpenError::TooLong(b.len()));
        }
        serde_json::from_slice(b).map_err(|e| OpenError::Malformed(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> OpenRequest {
        OpenRequest {
            version: 1,
            service: Service::Receive,
            size: 16 << 20,
            page_size: 4096,
            after_s: 0.5,
            disk: String::new(),
            request: None,
        }
    }

    #[test]
    fn round_trip_and_validation() {
        assert_eq!(OpenRequest::decode(&req().encode()), Ok(req()));
        let bad = |f: &dyn Fn(&mut OpenRequest)| {
            let mut r = req();
            f(&mut r);
            OpenRequest::decode(&r.encode()).unwrap_err()
        };
        assert_eq!(bad(&|r| r.version = 2), OpenError::Version(2));
        assert!(matches!(bad(&|r| r.size = 0), OpenError::Sizes { .. }));
        assert!(matches!(bad(&|r| r.size = 4097), OpenError::Sizes { .. }));
        assert!(matches!(bad(&|r| r.page_size = 3000), OpenError::Sizes { .. }));
        assert!(matches!(bad(&|r| r.page_size = 4 << 20), OpenError::Sizes { .. }));
        assert!(matches!(bad(&|r| r.after_s = -1.0), OpenError::After(_)));
        assert_eq!(bad(&|r| r.disk = "vm1".into()), OpenError::Control);
        let ctl = |f: &dyn Fn(&mut OpenRequest)| {
            let mut r = OpenRequest {
                version: 1,
                service: Service::DiskControl,
                size: 0,
                page_size: 0,
                after_s: 0.0,
                disk: "vm1".into(),
                request: Some(serde_json::json!("status")),
            };
            f(&mut r);
            OpenRequest::decode(&r.encode())
        };
        assert!(ctl(&|_| {}).is_ok());
        assert_eq!(ctl(&|r| r.disk.clear()), Err(OpenError::Control));
        assert_eq!(ctl(&|r| r.request = None), Err(OpenError::Control));
        assert_eq!(ctl(&|r| r.size = 4096), Err(OpenError::Control));
        let recv = |disk: &str, size: u64| {
            OpenRequest::decode(
                &OpenRequest {
                    version: 1,
                    service: Service::DiskReceive,
                    size,
                    page_size: 0,
                    after_s: 0.0,
                    disk: disk.into(),
                    request: None,
                }
                .encode(),
            )
        };
        assert!(recv("vm1-disk.img", 0).is_ok());
        for bad in ["", "../etc/passwd", ".hidden", "a/b", "sp ace", &"x".repeat(129)] {
            assert_eq!(recv(bad, 0), Err(OpenError::Receive), "{bad:?}");
        }
        assert_eq!(recv("vm1", 4096), Err(OpenError::Receive));
        assert!(matches!(OpenRequest::decode(b"{\"version\":1}"), Err(OpenError::Malformed(_))));
        assert!(matches!(OpenRequest::decode(&[b' '; 5000]), Err(OpenError::TooLong(5000))));
        let unknown = br#"{"version":1,"service":"receive","size":4096,"page_size":4096,"extra":1}"#;
        assert!(matches!(OpenRequest::decode(unknown), Err(OpenError::Malformed(_))));
        let r = OpenReply::Refused { reason: "full".into() };
        assert_eq!(OpenReply::decode(&r.encode()), Ok(r));
        assert_eq!(OpenReply::decode(&OpenReply::Opened { session: 3 }.encode()), Ok(OpenReply::Opened { session: 3 }));
    }
}
