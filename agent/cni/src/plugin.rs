//! The `palisade-cni` binary's whole work (see the crate doc): the binary
//! (in the `palisade` package, beside the agent it talks to) calls [`run`].

use std::io::Read;
use std::process::ExitCode;

use crate::protocol::{Reply, Request, call};
use crate::spec::{
    CniError, Command, ErrorCode, Invocation, LATEST, NetConf, at_least_1_1, result_json,
    version_json,
};

/// Prints the error JSON on stdout (the runtime reads it there) and fails.
fn fail(version: &str, e: &CniError) -> ExitCode {
    println!("{}", e.to_json(version));
    ExitCode::FAILURE
}

/// Reads the call from the environment and stdin, prints the result or
/// the error JSON on stdout; the exit code says which.
pub fn run() -> ExitCode {
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        let e = CniError::new(
            ErrorCode::Io,
            "reading the network configuration",
            e.to_string(),
        );
        return fail(LATEST, &e);
    }
    let invocation = match Invocation::from_env(|k| std::env::var(k).ok()) {
        Ok(i) => i,
        Err(e) => return fail(LATEST, &e),
    };
    if invocation.command == Command::Version {
        // The version asked for, if the input names one this plugin speaks.
        let asked = serde_json::from_slice::<serde_json::Value>(&stdin)
            .ok()
            .and_then(|v| v["cniVersion"].as_str().map(str::to_string))
            .filter(|v| crate::spec::SUPPORTED_VERSIONS.contains(&v.as_str()))
            .unwrap_or_else(|| LATEST.to_string());
        println!("{}", version_json(&asked));
        return ExitCode::SUCCESS;
    }
    let conf = match NetConf::parse(&stdin) {
        Ok(c) => c,
        Err(e) => return fail(LATEST, &e),
    };
    let version = conf.cni_version.clone();
    if matches!(invocation.command, Command::Status | Command::Gc) && !at_least_1_1(&version) {
        let e = CniError::new(
            ErrorCode::IncompatibleVersion,
            format!(
                "{:?} needs a configuration of CNI 1.1.0",
                invocation.command
            ),
            format!("this one says {version}"),
        );
        return fail(&version, &e);
    }
    let command = invocation.command;
    let request = Request {
        invocation,
        netconf: conf.raw.clone(),
    };
    match call(&conf.agent_socket, &request) {
        Ok(Reply::Attached(a)) if command == Command::Add => {
            println!("{}", result_json(&version, &a));
            ExitCode::SUCCESS
        }
        Ok(Reply::Done) if command != Command::Add => ExitCode::SUCCESS,
        Ok(Reply::Failed(e)) => fail(&version, &e),
        Err(e) => fail(&version, &e),
        Ok(other) => {
            let e = CniError::new(
                ErrorCode::Io,
                "the node agent answered out of turn",
                format!("{other:?} for {command:?}"),
            );
            fail(&version, &e)
        }
    }
}
