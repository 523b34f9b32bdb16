//! Errors of the CRI boundary.
//!
//! Keeps the runtime's own status code and message; knows which codes are
//! worth a retry and which mean another creator got there first.

use tonic::Code;

/// A failed CRI call.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    /// The endpoint is not of the form `unix:///path`.
    #[error("invalid CRI endpoint {0:?}: expected unix:///path/to/socket")]
    Endpoint(String),
    /// The runtime answered with a gRPC error; `message` is the runtime's own text.
    #[error("{call}: {message}")]
    Status {
        /// The RPC, e.g. `CreateContainer`.
        call: &'static str,
        /// The gRPC status code.
        code: Code,
        /// The runtime's message, unchanged.
        message: String,
    },
    /// The call did not finish within its deadline.
    #[error("{call}: no answer from the runtime within {secs} s")]
    Timeout {
        /// The RPC.
        call: &'static str,
        /// The deadline that passed.
        secs: u64,
    },
}

impl CriError {
    /// Wraps a tonic status, keeping the runtime's message. Transport failures
    /// (the socket is gone) arrive as `Unavailable` with tonic's description.
    pub fn from_status(call: &'static str, status: tonic::Status) -> Self {
        let message = if status.message().is_empty() {
            format!("{}", status.code())
        } else {
            status.message().to_string()
        };
        CriError::Status {
            call,
            code: status.code(),
            message,
        }
    }

    /// The gRPC code, if the runtime answered.
    pub fn code(&self) -> Option<Code> {
        match self {
            CriError::Status { code, .. } => Some(*code),
            CriError::Timeout { .. } => Some(Code::DeadlineExceeded),
            CriError::Endpoint(_) => None,
        }
    }

    /// The runtime's message (or ours, when it never answered).
    pub fn message(&self) -> String {
        match self {
            CriError::Status { message, .. } => message.clone(),
            other => other.to_string(),
        }
    }

    /// The error as Go's gRPC prints it: `rpc error: code = NotFound desc = …`.
    pub fn go_status_text(&self) -> String {
        match self {
            CriError::Status { code, message, .. } => {
                let name = match code {
                    Code::Cancelled => "Canceled".to_string(),
                    other => format!("{other:?}"),
                };
                format!("rpc error: code = {name} desc = {message}")
            }
            other => other.to_string(),
        }
    }

    /// Whether the same call may succeed later without anything in the request
    /// changing. The runtime being down, slow or busy, or refusing because of a
    /// state that can change (a target container not running yet, which
    /// containerd reports as UNKNOWN) is retryable; a request the runtime
    /// judged wrong (bad argument, unknown id, missing feature) is not.
    pub fn is_retryable(&self) -> bool {
        match self.code() {
            None => false,
            Some(code) => match code {
                Code::Unavailable
                | Code::DeadlineExceeded
                | Code::ResourceExhausted
                | Code::Aborted
                | Code::Cancelled
                | Code::Unknown
                | Code::Internal => true,
                Code::Ok
                | Code::InvalidArgument
                | Code::NotFound
                | Code::AlreadyExists
                | Code::PermissionDenied
                | Code::FailedPrecondition
                | Code::OutOfRange
                | Code::Unimplemented
                | Code::DataLoss
                | Code::Unauthenticated => false,
            },
        }
    }

    /// Whether the runtime is unreachable (as opposed to refusing this call).
    pub fn is_unavailable(&self) -> bool {
        self.code() == Some(Code::Unavailable)
    }

    /// Whether the runtime does not serve this RPC at all.
    pub fn is_unimplemented(&self) -> bool {
        self.code() == Some(Code::Unimplemented)
    }

    /// containerd refuses to start a container that another caller's start
    /// got to first: under way (`already in starting state`) or already
    /// settled since the caller looked (`container is in CONTAINER_RUNNING
    /// state`, `… CONTAINER_EXITED …`, an aborted start).
    pub fn is_started_elsewhere(&self) -> bool {
        matches!(self, CriError::Status { message, .. }
            if message.contains("already in starting state")
                || message.contains("container is in CONTAINER_RUNNING state")
                || message.contains("container is in CONTAINER_EXITED state"))
    }

    /// containerd and CRI-O refuse a second container with the same
    /// `{sandbox, name, attempt}`: someone else created it first.
    pub fn is_name_reserved(&self) -> bool {
        matches!(self, CriError::Status { message, .. }
            if message.contains("is reserved for") || message.contains("already reserved"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: Code, msg: &str) -> CriError {
        CriError::from_status("CreateContainer", tonic::Status::new(code, msg))
    }

    #[test]
    fn retryable_by_code() {
        let table = [
            (Code::Unavailable, true),
            (Code::DeadlineExceeded, true),
            (Code::Unknown, true),
            (Code::Internal, true),
            (Code::ResourceExhausted, true),
            (Code::NotFound, false),
            (Code::InvalidArgument, false),
            (Code::Unimplemented, false),
            (Code::FailedPrecondition, false),
            (Code::PermissionDenied, false),
        ];
        for (code, want) in table {
            assert_eq!(status(code, "x").is_retryable(), want, "{code:?}");
        }
    }

    #[test]
    fn keeps_the_runtime_message() {
        let e = status(Code::NotFound, "invalid target container: not found");
        assert_eq!(e.message(), "invalid target container: not found");
        assert_eq!(
            e.to_string(),
            "CreateContainer: invalid target container: not found"
        );
    }

    #[test]
    fn name_reserved_is_recognised() {
        let e = status(
            Code::Unknown,
            r#"failed to reserve container name "dbg_pod_ns_uid_0": name "dbg_pod_ns_uid_0" is reserved for "abc""#,
        );
        assert!(e.is_name_reserved());
        assert!(!status(Code::Unknown, "other").is_name_reserved());
    }

    #[test]
    fn start_by_someone_else_is_recognised() {
        for tail in [
            "container is already in starting state",
            "container is in CONTAINER_EXITED state",
            "container is in CONTAINER_RUNNING state",
        ] {
            let e = status(
                Code::Unknown,
                &format!(r#"failed to set starting state for container "abc": {tail}"#),
            );
            assert!(e.is_started_elsewhere(), "{tail}");
            assert!(!e.is_name_reserved());
        }
        assert!(!status(Code::Unknown, "other").is_started_elsewhere());
    }

    #[test]
    fn go_status_text_spells_codes_like_go() {
        assert_eq!(
            status(Code::NotFound, "no such image").go_status_text(),
            "rpc error: code = NotFound desc = no such image"
        );
        assert_eq!(
            status(Code::Cancelled, "x").go_status_text(),
            "rpc error: code = Canceled desc = x"
        );
    }

    #[test]
    fn empty_message_falls_back_to_the_code() {
        assert!(!status(Code::Unavailable, "").message().is_empty());
    }
}
