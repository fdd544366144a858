//! `blindgate e3 seal|open|keygen`: seal a file or stdin with a device key file, open it
//! again, and make new device key files. Other tools script these, so the flags are a
//! stable interface: inputs default to stdin, outputs to stdout.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand, ValueEnum};
use e3::{DeviceId, DeviceKey, KeyFileError, Kind, OpenError, SealError, Suite};
use thiserror::Error;

/// The `e3` subcommands.
#[derive(Debug, Subcommand)]
pub enum E3Command {
    /// Seal IN (default stdin) into an envelope written to OUT (default stdout).
    Seal(SealArgs),
    /// Open the envelope in IN (default stdin) and write the plaintext to OUT.
    Open(OpenArgs),
    /// Write a new random device key file (mode 0600).
    Keygen(KeygenArgs),
}

/// Flags of `e3 seal`.
#[derive(Debug, Args)]
pub struct SealArgs {
    /// Device key file; the suite, device id and key id come from it.
    #[arg(long, value_name = "K")]
    key_file: PathBuf,
    /// Sequence number, 1 or more; never reuse one for the same device and direction.
    #[arg(long, value_name = "N")]
    seq: u64,
    /// What the envelope carries.
    #[arg(long, value_enum, default_value_t = KindArg::Uplink)]
    kind: KindArg,
    /// Input file; stdin when absent or `-`.
    #[arg(value_name = "IN")]
    input: Option<PathBuf>,
    /// Output file; stdout when absent or `-`.
    #[arg(short, long, value_name = "OUT")]
    output: Option<PathBuf>,
}

/// Flags of `e3 open`.
#[derive(Debug, Args)]
pub struct OpenArgs {
    /// Device key file of the device the envelope belongs to.
    #[arg(long, value_name = "K")]
    key_file: PathBuf,
    /// Envelope file; stdin when absent or `-`.
    #[arg(value_name = "IN")]
    input: Option<PathBuf>,
    /// Plaintext output file; stdout when absent or `-`.
    #[arg(short, long, value_name = "OUT")]
    output: Option<PathBuf>,
    /// Print the envelope's header fields to stderr.
    #[arg(long)]
    show_header: bool,
}

/// Flags of `e3 keygen`.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Device id: 1..=64 characters of [A-Za-z0-9._-].
    #[arg(long, value_name = "ID")]
    device: String,
    /// AEAD suite the key seals with.
    #[arg(long, value_enum, default_value_t = SuiteArg::Aes256Gcm)]
    suite: SuiteArg,
    /// Key id (which of the device's keys this is).
    #[arg(long, value_name = "N", default_value_t = 1)]
    key_id: u32,
    /// Where to write the key file (created with mode 0600).
    #[arg(short, long, value_name = "K")]
    output: PathBuf,
    /// Replace an existing key file.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum KindArg {
    Uplink,
    Command,
    Receipt,
}

impl From<KindArg> for Kind {
    fn from(kind: KindArg) -> Self {
        match kind {
            KindArg::Uplink => Self::Uplink,
            KindArg::Command => Self::Command,
            KindArg::Receipt => Self::Receipt,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum SuiteArg {
    #[value(name = "aes-256-gcm")]
    Aes256Gcm,
    #[value(name = "chacha20-poly1305")]
    ChaCha20Poly1305,
}

impl From<SuiteArg> for Suite {
    fn from(suite: SuiteArg) -> Self {
        match suite {
            SuiteArg::Aes256Gcm => Self::Aes256Gcm,
            SuiteArg::ChaCha20Poly1305 => Self::ChaCha20Poly1305,
        }
    }
}

/// Why an `e3` subcommand failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum E3ToolError {
    /// The key file could not be read or written.
    #[error("device key file problem")]
    KeyFile(#[from] KeyFileError),
    /// Reading the input failed.
    #[error("cannot read {}", display_path(.path))]
    Read {
        /// The input (`None`: stdin).
        path: Option<PathBuf>,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Writing the output failed.
    #[error("cannot write {}", display_path(.path))]
    Write {
        /// The output (`None`: stdout).
        path: Option<PathBuf>,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Sealing failed.
    #[error("cannot seal")]
    Seal(#[from] SealError),
    /// Opening failed: malformed, tampered, or another key's envelope.
    #[error("cannot open envelope")]
    Open(#[from] OpenError),
    /// The device id given to keygen is invalid.
    #[error("invalid device id")]
    DeviceId(#[source] e3::HeaderError),
}

fn display_path(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map_or_else(|| "stdin/stdout".to_owned(), |p| p.display().to_string())
}

/// Runs one `e3` subcommand.
///
/// # Errors
/// An [`E3ToolError`] naming what failed.
pub fn run(cmd: E3Command) -> Result<(), E3ToolError> {
    match cmd {
        E3Command::Seal(args) => seal(&args),
        E3Command::Open(args) => open(&args),
        E3Command::Keygen(args) => keygen(&args),
    }
}

fn seal(args: &SealArgs) -> Result<(), E3ToolError> {
    let key = e3::read_key_file(&args.key_file)?;
    let plaintext = read_input(args.input.as_deref())?;
    let envelope = key.seal(args.kind.into(), args.seq, &plaintext)?;
    write_output(args.output.as_deref(), &envelope)
}

fn open(args: &OpenArgs) -> Result<(), E3ToolError> {
    let key = e3::read_key_file(&args.key_file)?;
    let mut envelope = read_input(args.input.as_deref())?;
    let opened = key.open_in_place(&mut envelope)?;
    if args.show_header {
        let h = opened.header;
        eprintln!(
            "kind={} suite={} device_id={} key_id={} seq={}",
            h.kind(),
            h.suite(),
            h.device_id(),
            h.key_id(),
            h.seq()
        );
    }
    write_output(args.output.as_deref(), opened.plaintext)
}

fn keygen(args: &KeygenArgs) -> Result<(), E3ToolError> {
    let device = DeviceId::new(&args.device).map_err(E3ToolError::DeviceId)?;
    let key = DeviceKey::generate(device, args.key_id, args.suite.into(), &mut e3::OsRng);
    e3::write_key_file(&args.output, &key, args.force)?;
    Ok(())
}

fn is_stdio(path: Option<&Path>) -> bool {
    path.is_none_or(|p| p == Path::new("-"))
}

fn read_input(path: Option<&Path>) -> Result<Vec<u8>, E3ToolError> {
    let mut bytes = Vec::new();
    let result = if is_stdio(path) {
        io::stdin().lock().read_to_end(&mut bytes)
    } else {
        File::open(path.unwrap_or(Path::new("-"))).and_then(|mut f| f.read_to_end(&mut bytes))
    };
    result.map_err(|source| E3ToolError::Read {
        path: path.map(Path::to_owned),
        source,
    })?;
    Ok(bytes)
}

fn write_output(path: Option<&Path>, bytes: &[u8]) -> Result<(), E3ToolError> {
    let result = if is_stdio(path) {
        let mut out = io::stdout().lock();
        out.write_all(bytes).and_then(|()| out.flush())
    } else {
        std::fs::write(path.unwrap_or(Path::new("-")), bytes)
    };
    result.map_err(|source| E3ToolError::Write {
        path: path.map(Path::to_owned),
        source,
    })
}
