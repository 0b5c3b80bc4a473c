//! Exit codes: one per failure class, decided in one place so scripts and
//! agents can branch on them. `HELP` is what `gractl --help` shows.

use std::{io, process::ExitCode};

use crate::{client::ClientError, config::ConfigError, output::Format, outputs, ssh, transfer};

/// Shown under `gractl --help`; keep it in step with [`Code`].
pub const HELP: &str = "\
Exit codes:
    0  success
    1  internal or unexpected error
    2  usage: a bad flag, argument or config file, or the server rejected an argument
    3  auth: not logged in, invalid or expired token, permission denied; a runner's
       SSH host key differs from the one grad recorded, or the runner refused
       gractl's SSH key
    4  not found (runners, files for `cp`)
    5  precondition: wrong state (e.g. runner paused, or no SSH host key recorded
       yet), already exists, runner failed while waiting, file already exists
    6  unavailable: cannot reach grad or the runner (the SSH connection failed),
       or the runner could not run the code (execution status \"failed\": no
       interpreter, interpreter died)
    7  timeout: --timeout or a --wait deadline passed
    8  the executed code raised an exception (execution status \"error\")
    9  the job failed or was cancelled (`job wait`, `job submit --wait`)
  130  interrupted (Ctrl-C, or the execution was cancelled)

`gractl ssh RUNNER -- COMMAND` exits with COMMAND's status (128+N if signal N
killed it, 255 if the runner never said); its own failures use the codes above.

Errors go to stderr as `error: MESSAGE`, or with -o json/ndjson as
{\"error\":{\"code\":\"not_found\",\"message\":\"...\"}}.

Environment: GRAD_SERVER (server URL), GRAD_TOKEN (token; overrides the one
stored by `gractl login`), GRACTL_CONFIG (credentials file), GRAD_WORKSPACE
(workspace directory).";

/// A class of failure, with its exit code as the discriminant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    Internal = 1,
    Usage = 2,
    Auth = 3,
    NotFound = 4,
    Precondition = 5,
    Unavailable = 6,
    Timeout = 7,
    CodeRaised = 8,
    JobFailed = 9,
    Interrupted = 130,
}

impl Code {
    /// The stable name used in `{"error":{"code":...}}`.
    pub fn name(self) -> &'static str {
        match self {
            Code::Internal => "internal",
            Code::Usage => "usage",
            Code::Auth => "auth",
            Code::NotFound => "not_found",
            Code::Precondition => "precondition",
            Code::Unavailable => "unavailable",
            Code::Timeout => "timeout",
            Code::CodeRaised => "code_raised",
            Code::JobFailed => "job_failed",
            Code::Interrupted => "interrupted",
        }
    }

    pub fn exit_code(self) -> ExitCode {
        ExitCode::from(self as u8)
    }

    /// The class of a gRPC status from grad.
    pub fn from_status(code: tonic::Code) -> Code {
        use tonic::Code as C;
        match code {
            C::InvalidArgument | C::OutOfRange => Code::Usage,
            C::Unauthenticated | C::PermissionDenied => Code::Auth,
            C::NotFound => Code::NotFound,
            C::FailedPrecondition | C::AlreadyExists | C::Aborted | C::ResourceExhausted => {
                Code::Precondition
            }
            C::Unavailable => Code::Unavailable,
            C::DeadlineExceeded => Code::Timeout,
            C::Cancelled => Code::Interrupted,
            C::Ok | C::Unknown | C::Unimplemented | C::Internal | C::DataLoss => Code::Internal,
        }
    }

    /// The class of a status from grad, or of the connection to it failing
    /// in the middle of a call (tonic reports that as UNKNOWN, with the
    /// I/O or HTTP/2 error behind it): unavailable, like not reaching grad.
    pub fn from_grpc(status: &tonic::Status) -> Code {
        if status.code() == tonic::Code::Unknown && connection_lost(status) {
            return Code::Unavailable;
        }
        Code::from_status(status.code())
    }

    pub fn from_client_error(error: &ClientError) -> Code {
        match error {
            ClientError::InvalidUrl { .. } => Code::Usage,
            ClientError::Connect { .. } => Code::Unavailable,
            ClientError::InvalidToken => Code::Auth,
            ClientError::Status(status) => Code::from_grpc(status),
        }
    }

    pub fn from_config_error(error: &ConfigError) -> Code {
        match error {
            ConfigError::Invalid { .. }
            | ConfigError::NotAWorkspace { .. }
            | ConfigError::NoServer
            | ConfigError::NoRunner => Code::Usage,
            ConfigError::NotLoggedIn => Code::Auth,
            ConfigError::Exists { .. } => Code::Precondition,
            ConfigError::Read { .. } | ConfigError::Write { .. } => Code::Internal,
        }
    }

    pub fn from_ssh_error(error: &ssh::Error) -> Code {
        use ssh::Error as E;
        match error {
            E::Grad(error) => Code::from_client_error(error),
            E::NoHostKey { .. } => Code::Precondition,
            E::HostKeyMismatch { .. } | E::KeyRejected { .. } => Code::Auth,
            E::BadHostKey { .. } | E::Output(_) => Code::Internal,
            E::Ssh { .. }
            | E::HandshakeTimeout { .. }
            | E::Channel(_)
            | E::Refused { .. }
            | E::Sftp(_) => Code::Unavailable,
            E::Key { .. } => Code::Usage,
        }
    }

    pub fn from_transfer_error(error: &transfer::Error) -> Code {
        use russh_sftp::client::error::Error as Sftp;
        use transfer::Error as E;
        match error {
            E::NotFound { .. } => Code::NotFound,
            E::IsDirectory { .. } | E::NotADirectory { .. } => Code::Usage,
            E::NotADirectoryTarget { .. } => Code::Precondition,
            E::PermissionDenied { .. } => Code::Auth,
            E::Local { .. } => Code::Internal,
            E::Remote { source, .. } => match source {
                Sftp::Timeout | Sftp::IO(_) => Code::Unavailable,
                _ => Code::Internal,
            },
        }
    }

    pub fn from_outputs_error(error: &outputs::Error) -> Code {
        use outputs::Error as E;
        match error {
            E::Symlink(_) | E::NotADirectory(_) => Code::Precondition,
            E::Download { .. } => Code::Unavailable,
            E::UnsafePath(_) | E::Local { .. } | E::NoUrl(_) => Code::Internal,
        }
    }

    /// The class of any error a command returns: the first error in the chain
    /// that knows its class wins; anything else is internal.
    pub fn of(error: &anyhow::Error) -> Code {
        for cause in error.chain() {
            if let Some(failure) = cause.downcast_ref::<Failure>() {
                return failure.code;
            }
            if let Some(error) = cause.downcast_ref::<ClientError>() {
                return Code::from_client_error(error);
            }
            if let Some(error) = cause.downcast_ref::<ConfigError>() {
                return Code::from_config_error(error);
            }
            if let Some(error) = cause.downcast_ref::<ssh::Error>() {
                return Code::from_ssh_error(error);
            }
            if let Some(error) = cause.downcast_ref::<transfer::Error>() {
                return Code::from_transfer_error(error);
            }
            if let Some(error) = cause.downcast_ref::<outputs::Error>() {
                return Code::from_outputs_error(error);
            }
            if cause.downcast_ref::<grad_transfer::Error>().is_some() {
                return Code::Unavailable;
            }
            if let Some(error) = cause.downcast_ref::<grad_bundle::Error>() {
                return match error {
                    grad_bundle::Error::Ignore(_) => Code::Usage,
                    _ => Code::Internal,
                };
            }
            if let Some(status) = cause.downcast_ref::<tonic::Status>() {
                return Code::from_grpc(status);
            }
        }
        Code::Internal
    }
}

/// Whether the status stands for the connection to grad breaking: an I/O
/// error behind it, or tonic's words for an HTTP/2 or body failure.
fn connection_lost(status: &tonic::Status) -> bool {
    let mut cause = std::error::Error::source(status);
    while let Some(error) = cause {
        if error.downcast_ref::<std::io::Error>().is_some() {
            return true;
        }
        cause = error.source();
    }
    let message = status.message();
    message.starts_with("h2 protocol error") || message.starts_with("transport error")
}

/// A failure whose class the command decided itself (a runner that ended
/// FAILED while waiting, user code that raised, a file given on the command
/// line that cannot be read). `quiet` failures were already reported on the
/// output (a traceback, a JSON document) and only set the exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub code: Code,
    pub message: String,
    pub quiet: bool,
}

impl Failure {
    pub fn new(code: Code, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
            quiet: false,
        }
    }

    pub fn quiet(code: Code) -> Failure {
        Failure {
            code,
            message: String::new(),
            quiet: true,
        }
    }
}

/// A remote command's exit code (`gractl ssh RUNNER -- COMMAND`), passed
/// through as gractl's own; nothing is printed.
#[derive(Debug, thiserror::Error)]
#[error("the remote command exited with status {0}")]
pub struct RemoteExit(pub u8);

/// Prints `error` to stderr in the shape `format` asks for and returns the
/// exit code for its class.
pub fn report(error: &anyhow::Error, format: Format) -> ExitCode {
    if let Some(RemoteExit(code)) = error
        .chain()
        .find_map(|cause| cause.downcast_ref::<RemoteExit>())
    {
        return ExitCode::from(*code);
    }
    // A closed pipe (`gractl runner list | head -1`) is the reader's choice, not a failure.
    let broken_pipe = error.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    });
    if broken_pipe {
        return ExitCode::SUCCESS;
    }
    let code = Code::of(error);
    let quiet = error
        .chain()
        .any(|cause| cause.downcast_ref::<Failure>().is_some_and(|f| f.quiet));
    if !quiet {
        let message = format!("{error:#}");
        match format {
            Format::Table => eprintln!("error: {message}"),
            Format::Json | Format::Ndjson => {
                let document = serde_json::json!({
                    "error": { "code": code.name(), "message": message }
                });
                eprintln!("{document}");
            }
        }
    }
    code.exit_code()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_grpc_code_maps_to_its_documented_exit_code() {
        use tonic::Code as C;
        let expected = [
            (C::InvalidArgument, 2),
            (C::Unauthenticated, 3),
            (C::PermissionDenied, 3),
            (C::NotFound, 4),
            (C::FailedPrecondition, 5),
            (C::AlreadyExists, 5),
            (C::Aborted, 5),
            (C::Unavailable, 6),
            (C::DeadlineExceeded, 7),
            (C::Cancelled, 130),
            (C::Internal, 1),
            (C::Unknown, 1),
            (C::Unimplemented, 1),
        ];
        for (status, exit) in expected {
            assert_eq!(Code::from_status(status) as u8, exit, "{status:?}");
        }
    }

    #[test]
    fn a_connection_broken_mid_call_is_unavailable_and_says_so() {
        let body =
            tonic::Status::unknown("h2 protocol error: error reading a body from connection");
        assert_eq!(Code::from_grpc(&body), Code::Unavailable);
        let mut reset = tonic::Status::unknown("stream ended");
        reset.set_source(std::sync::Arc::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )));
        assert_eq!(Code::from_grpc(&reset), Code::Unavailable);
        // An UNKNOWN answer from grad itself stays internal.
        assert_eq!(
            Code::from_grpc(&tonic::Status::unknown("something odd")),
            Code::Internal
        );
        let shown = ClientError::from(body).to_string();
        assert!(shown.contains("the connection to grad broke"), "{shown}");
    }

    #[test]
    fn a_status_inside_a_client_error_keeps_its_class_through_context() {
        let error = anyhow::Error::from(ClientError::from(tonic::Status::not_found(
            "runner \"x\" not found",
        )))
        .context("getting runner x");
        assert_eq!(Code::of(&error), Code::NotFound);
        assert_eq!(Code::of(&error).name(), "not_found");
    }

    #[test]
    fn an_unreachable_server_is_unavailable_and_a_bad_url_is_usage() {
        let connect = anyhow::Error::from(ClientError::Connect {
            url: "http://127.0.0.1:1".into(),
            reason: "connection refused".into(),
        });
        assert_eq!(Code::of(&connect), Code::Unavailable);
        let url = anyhow::Error::from(ClientError::InvalidUrl {
            url: "::".into(),
            reason: "invalid authority".into(),
        });
        assert_eq!(Code::of(&url), Code::Usage);
    }

    #[test]
    fn missing_credentials_are_an_auth_failure() {
        assert_eq!(Code::of(&ConfigError::NotLoggedIn.into()), Code::Auth);
    }

    #[test]
    fn a_host_key_mismatch_is_an_auth_failure_and_a_missing_one_a_precondition() {
        let mismatch = ssh::Error::HostKeyMismatch {
            runner: "r1".into(),
            expected: "SHA256:a".into(),
            got: "SHA256:b".into(),
        };
        assert_eq!(Code::of(&mismatch.into()), Code::Auth);
        let missing = ssh::Error::NoHostKey {
            runner: "r1".into(),
        };
        assert_eq!(Code::of(&missing.into()), Code::Precondition);
        let paused = ssh::Error::Grad(ClientError::from(tonic::Status::failed_precondition(
            "runner r1 is paused",
        )));
        assert_eq!(Code::of(&paused.into()), Code::Precondition);
    }

    #[test]
    fn copy_errors_are_classed_by_what_went_wrong() {
        let missing = transfer::Error::NotFound {
            path: "r1:x".into(),
        };
        assert_eq!(Code::of(&missing.into()), Code::NotFound);
        let directory = transfer::Error::IsDirectory { path: "d".into() };
        assert_eq!(Code::of(&directory.into()), Code::Usage);
    }

    #[test]
    fn a_remote_exit_status_passes_through_silently() {
        let error = anyhow::Error::from(RemoteExit(42));
        assert_eq!(report(&error, Format::Json), ExitCode::from(42));
    }

    #[test]
    fn unclassified_errors_are_internal() {
        assert_eq!(Code::of(&anyhow::anyhow!("boom")), Code::Internal);
    }

    #[test]
    fn help_lists_every_exit_code() {
        for code in [
            Code::Internal,
            Code::Usage,
            Code::Auth,
            Code::NotFound,
            Code::Precondition,
            Code::Unavailable,
            Code::Timeout,
            Code::CodeRaised,
            Code::Interrupted,
        ] {
            let line = format!("{:>5}  ", code as u8);
            assert!(HELP.contains(&line), "{code:?} missing from HELP");
        }
    }
}
