//! `blindgate manpage` (hidden): the man pages, generated from the command line
//! definition itself (clap_mangen), so the packaged pages cannot drift from the CLI.
//!
//! Without `--out` it prints blindgate(1) to standard output. With `--out DIR` it
//! writes blindgate.1 and one page per subcommand (blindgate-gateway.1,
//! blindgate-cloud-run.1, ...), which is what the .deb installs (docs/PACKAGING.md).

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use clap::{Args, CommandFactory};

use crate::cli::Cli;

/// Flags of `manpage`.
#[derive(Debug, Args)]
pub(crate) struct ManpageArgs {
    /// Write blindgate.1 and one page per subcommand into this directory (created if
    /// missing) instead of printing blindgate(1).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

/// Runs `blindgate manpage`.
///
/// # Errors
/// The directory cannot be created or a page cannot be written.
pub(crate) fn run(args: &ManpageArgs) -> io::Result<()> {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    match &args.out {
        None => {
            let mut stdout = io::stdout().lock();
            page(cmd).render(&mut stdout)?;
            stdout.flush()
        }
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            write_all(&cmd, dir)
        }
    }
}

/// The page of one command, dated by [`page_date`].
fn page(cmd: clap::Command) -> clap_mangen::Man {
    clap_mangen::Man::new(cmd)
        .date(page_date())
        .manual("blindgate manual")
}

/// `SOURCE_DATE_EPOCH` as YYYY-MM-DD when set (reproducible builds; `.ci/check-deb`
/// sets it to the newest Debian changelog entry), else today (UTC).
fn page_date() -> String {
    let date = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .and_then(|secs| time::OffsetDateTime::from_unix_timestamp(secs).ok())
        .unwrap_or_else(time::OffsetDateTime::now_utc)
        .date();
    format!(
        "{:04}-{:02}-{:02}",
        date.year(),
        u8::from(date.month()),
        date.day()
    )
}

/// Writes the page of `cmd` and, recursively, of each visible subcommand.
fn write_all(cmd: &clap::Command, dir: &Path) -> io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_all(sub, dir)?;
    }
    let path = page(cmd.clone()).generate_to(dir)?;
    println!("{}", path.display());
    Ok(())
}
