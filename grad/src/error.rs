//! The domain error of grad, and its one mapping to gRPC statuses.

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("store: {0}")]
    Store(#[from] sqlx::Error),
    #[error("store migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("backend: {0}")]
    Backend(#[from] crate::backend::Error),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("token: {0}")]
    Token(#[from] jsonwebtoken::errors::Error),
    #[error("serving: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// The answer of the replica a call was forwarded to, passed on as it is.
    #[error("{}", .0.message())]
    Forwarded(Status),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The same error with `more` after its message. Internal errors stay
    /// as they are: their text is not the client's to read.
    pub fn explained(self, more: &str) -> Error {
        match self {
            Error::InvalidArgument(m) => Error::InvalidArgument(m + more),
            Error::NotFound(m) => Error::NotFound(m + more),
            Error::AlreadyExists(m) => Error::AlreadyExists(m + more),
            Error::FailedPrecondition(m) => Error::FailedPrecondition(m + more),
            Error::PermissionDenied(m) => Error::PermissionDenied(m + more),
            Error::Unauthenticated(m) => Error::Unauthenticated(m + more),
            Error::Unavailable(m) => Error::Unavailable(m + more),
            Error::DeadlineExceeded(m) => Error::DeadlineExceeded(m + more),
            internal => internal,
        }
    }

    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}

/// The one place where domain errors become gRPC statuses. Internal causes
/// are logged here and hidden from the client.
pub fn to_status(err: Error) -> Status {
    let code = match &err {
        Error::Forwarded(status) => return status.clone(),
        Error::InvalidArgument(_) => Code::InvalidArgument,
        Error::NotFound(_) => Code::NotFound,
        Error::AlreadyExists(_) => Code::AlreadyExists,
        Error::FailedPrecondition(_) => Code::FailedPrecondition,
        Error::PermissionDenied(_) => Code::PermissionDenied,
        Error::Unauthenticated(_) => Code::Unauthenticated,
        Error::Unavailable(_) => Code::Unavailable,
        Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
        Error::Store(_)
        | Error::Migrate(_)
        | Error::Backend(_)
        | Error::Io { .. }
        | Error::Token(_)
        | Error::Serve(_) => {
            tracing::error!(error = %err, "internal error");
            return Status::internal("internal error; see the grad log");
        }
    };
    Status::new(code, err.to_string())
}

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        to_status(err)
    }
}
