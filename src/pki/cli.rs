//! `blindgate certs dev`: flags for generating a development PKI, and the command.

use std::path::PathBuf;

use super::{DevPkiOptions, LabConfigs, PkiError, generate_dev_pki};

/// Generate a development PKI: a cloud CA and a device CA, the cloud broker's, the
/// gateway's, the cloud ingest's and each device's certificate (for local use only),
/// and lab configs beside them: gateway.toml, cloud.toml, registry.toml and
/// commands.toml (the installed examples with paths, endpoints and listeners for a lab
/// in DIR, every lab device a `thermostat` in the command allowlist; the cloud broker
/// is expected at <cloud-host>:8884).
#[derive(Debug, Clone, clap::Args)]
pub struct CertsDevArgs {
    /// Directory to write the PEM files and lab configs to.
    #[arg(long, default_value = "certs/dev")]
    out: PathBuf,
    /// The gateway's id (CN of its certificates).
    #[arg(long, default_value = "gw-1")]
    gateway_id: String,
    /// A device to issue a certificate for (repeat the flag for more).
    #[arg(long = "device", value_name = "ID", default_values = ["pump-17", "meter-9", "cam-1"])]
    devices: Vec<String>,
    /// Host name or IP address the gateway uses for the cloud broker.
    #[arg(long, default_value = "localhost")]
    cloud_host: String,
    /// Validity of every certificate, in days.
    #[arg(long, default_value_t = 365)]
    days: u32,
    /// Replace existing files.
    #[arg(long)]
    force: bool,
}

impl From<CertsDevArgs> for DevPkiOptions {
    fn from(args: CertsDevArgs) -> Self {
        Self {
            out_dir: args.out,
            gateway_id: args.gateway_id,
            devices: args.devices,
            cloud_host: args.cloud_host,
            validity_days: args.days,
            force: args.force,
        }
    }
}

/// Generates the dev PKI and the lab configs and prints each file written, one per
/// line.
///
/// # Errors
/// See [`PkiError`]; nothing is written if a file exists and `--force` was not given.
pub fn run(args: CertsDevArgs) -> Result<(), PkiError> {
    let opts = DevPkiOptions::from(args);
    let lab = LabConfigs::render(&opts)?;
    if !opts.force {
        lab.refuse_existing()?;
    }
    let pki = generate_dev_pki(&opts)?;
    lab.write(opts.force)?;
    for paths in pki.pairs() {
        println!("{}", paths.cert.display());
        println!("{}", paths.key.display());
    }
    for (path, _) in lab.files() {
        println!("{}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Harness {
        #[command(flatten)]
        args: CertsDevArgs,
    }

    fn parse(argv: &[&str]) -> DevPkiOptions {
        let argv = std::iter::once("certs-dev").chain(argv.iter().copied());
        DevPkiOptions::from(Harness::parse_from(argv).args)
    }

    #[test]
    fn defaults_match_the_library_defaults() {
        assert_eq!(parse(&[]), DevPkiOptions::default());
    }

    #[test]
    fn devices_given_replace_the_default_devices() {
        let opts = parse(&["--device", "a", "--device", "b", "--days", "7", "--force"]);
        assert_eq!(opts.devices, ["a", "b"]);
        assert_eq!(opts.validity_days, 7);
        assert!(opts.force);
    }
}
