//! Plugin to agent: one request per connection on a Unix socket only root
//! can open (the agent creates it mode 0600 in a 0700 directory). The
//! plugin writes one JSON request and closes its half; the agent answers
//! with one JSON reply and closes.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::spec::{Attached, CniError, ErrorCode, Invocation};

/// What the plugin asks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// The environment.
    pub invocation: Invocation,
    /// The network configuration as given on stdin.
    pub netconf: Value,
}

/// What the agent answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    /// ADD: what it made.
    Attached(Attached),
    /// DEL, CHECK, STATUS, GC: done.
    Done,
    /// The call failed.
    Failed(CniError),
}

/// How long the plugin waits for the agent (an ADD waits for the pod's
/// policy to be in the kernel).
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// Sends `request` to the agent at `socket` and returns its reply; an
/// agent that is not there is "try again later".
pub fn call(socket: &str, request: &Request) -> Result<Reply, CniError> {
    let down = |e: std::io::Error| {
        CniError::new(
            ErrorCode::TryAgainLater,
            format!("the Palisade node agent is not reachable at {socket}"),
            format!("{e} (is `palisade agent` running on this node?)"),
        )
    };
    let io = |what: &str, e: std::io::Error| {
        CniError::new(
            ErrorCode::Io,
            format!("talking to the node agent: {what}"),
            e.to_string(),
        )
    };
    let mut stream = UnixStream::connect(socket).map_err(down)?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .map_err(|e| io("timeout", e))?;
    let body = serde_json::to_vec(request)
        .map_err(|e| CniError::new(ErrorCode::Decode, "encoding the request", e.to_string()))?;
    stream.write_all(&body).map_err(|e| io("sending", e))?;
    stream
        .shutdown(std::net::Shutdown::Write)
        .map_err(|e| io("sending", e))?;
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .map_err(|e| io("reading the reply", e))?;
    serde_json::from_slice(&answer).map_err(|e| {
        CniError::new(
            ErrorCode::Io,
            "the node agent's reply is not one this plugin understands",
            format!("{e} (agent and plugin of different versions?)"),
        )
    })
}
