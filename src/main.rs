//! The `artifactfs` binary: parses the command line, wires concrete parts together and calls the
//! engine. It owns no storage logic; see `artifactfs-core`.

mod cli;
mod control;
mod lifecycle;
mod mount;
mod output;
mod serve;
mod tier;
mod watch;

use std::process::ExitCode;

fn main() -> ExitCode {
    match cli::run() {
        Ok(code) => code,
        Err(e) => {
            let code = cli::exit_code(&e);
            eprintln!("artifactfs: error: {e:#}");
            ExitCode::from(code)
        }
    }
}
