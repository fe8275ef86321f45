//! The CLI's side: requests to a running gateway through its control socket, and the
//! same peer operations on the state dir when no gateway runs.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use ipc_schema::Channel;
use ipc_schema::messages::control::{CliEnd, ControlReply, ControlRequest};

use crate::CONTROL_SOCKET;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach the gateway's control socket {0}: {1}")]
    Connect(String, io::Error),
    #[error("control channel: {0}")]
    Channel(#[from] ipc_schema::ChannelError),
}

/// Sends one request to the gateway of `state_dir`. `Ok(None)`: no gateway runs there
/// (no socket, or nobody listening on it).
pub fn request(
    state_dir: &Path,
    req: &ControlRequest,
) -> Result<Option<ControlReply>, ControlError> {
    let path = state_dir.join(CONTROL_SOCKET);
    let sock = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(ControlError::Connect(path.display().to_string(), e)),
    };
    let timeout = Some(Duration::from_secs(10));
    sock.set_read_timeout(timeout)
        .and_then(|()| sock.set_write_timeout(timeout))
        .map_err(|e| ControlError::Connect(path.display().to_string(), e))?;
    let mut ch = Channel::<CliEnd>::open(sock)?;
    ch.send(req, &[])?;
    Ok(Some(ch.recv()?.msg))
}
