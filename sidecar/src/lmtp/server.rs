//! The Unix socket listener Postfix connects to.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Backend, Limits, serve_session};
use crate::error::{Error, Result};

/// Pause after a failed accept (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(100);

/// A bound LMTP socket, ready to [`serve`](Self::serve).
#[derive(Debug)]
pub struct LmtpListener {
    listener: UnixListener,
    path: PathBuf,
}

impl LmtpListener {
    /// Binds `path`, replacing a socket left by an earlier run (never any other kind of file), and opens it to
    /// every user: Postfix's LMTP client runs as the postfix user, and the directory is private to the pod.
    /// Must be called within a tokio runtime.
    pub fn bind(path: &Path) -> Result<Self> {
        let socket_error = |action, source| Error::LmtpSocket {
            path: path.to_owned(),
            action,
            source,
        };
        match std::fs::symlink_metadata(path) {
            Ok(metadata) if metadata.file_type().is_socket() => {
                std::fs::remove_file(path).map_err(|source| socket_error("remove the stale socket", source))?;
            }
            Ok(_) => return Err(Error::LmtpPathOccupied { path: path.to_owned() }),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(socket_error("inspect the path", source)),
        }
        let listener = UnixListener::bind(path).map_err(|source| socket_error("bind", source))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
            .map_err(|source| socket_error("set mode 0666 on", source))?;
        Ok(Self {
            listener,
            path: path.to_owned(),
        })
    }

    /// Accepts sessions until `shutdown` is cancelled, then removes the socket (so Postfix's next attempts fail
    /// at once and its mail stays queued) and returns once every session has ended. Sessions in a transaction
    /// finish it, idle ones are closed with 421 (see [`serve_session`]).
    pub async fn serve<B: Backend>(self, backend: Arc<B>, limits: Limits, shutdown: CancellationToken) {
        let sessions = TaskTracker::new();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let (backend, shutdown) = (Arc::clone(&backend), shutdown.clone());
                        sessions.spawn(async move {
                            if let Err(err) = serve_session(stream, &*backend, &limits, &shutdown).await {
                                tracing::info!(%err, "LMTP session ended with an I/O error");
                            }
                        });
                    }
                    Err(err) => {
                        tracing::warn!(%err, "cannot accept an LMTP connection");
                        tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
                    }
                },
            }
        }
        drop(self.listener);
        if let Err(err) = std::fs::remove_file(&self.path) {
            tracing::warn!(%err, path = %self.path.display(), "cannot remove the LMTP socket");
        }
        sessions.close();
        sessions.wait().await;
    }
}
