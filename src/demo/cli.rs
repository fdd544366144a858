//! `blindgate demo` flags and the printed summary.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::{DemoOptions, run_demo};
use crate::config::units::{parse_byte_size, parse_duration};

/// Flags of `blindgate demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where to put the run's files (default: a new directory under the system temp dir).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Sensor devices (a camera is added).
    #[arg(long, default_value_t = 3)]
    sensors: usize,
    /// Readings per second per sensor.
    #[arg(long, default_value_t = 5.0)]
    rate: f64,
    /// How long devices produce new messages.
    #[arg(long, default_value = "30s", value_parser = duration)]
    duration: Duration,
    /// When the cloud link is cut.
    #[arg(long, default_value = "10s", value_parser = duration)]
    outage_at: Duration,
    /// How long the cloud link stays cut.
    #[arg(long, default_value = "6s", value_parser = duration)]
    outage: Duration,
    /// Camera images to send.
    #[arg(long, default_value_t = 2)]
    images: u32,
    /// Size of each camera image.
    #[arg(long, default_value = "1600000B", value_parser = size)]
    image_size: u64,
}

fn duration(text: &str) -> Result<Duration, String> {
    parse_duration(text).map_err(|e| e.to_string())
}

fn size(text: &str) -> Result<u64, String> {
    parse_byte_size(text).map_err(|e| e.to_string())
}

/// Runs the demo; an error if anything was lost.
///
/// # Errors
/// Set-up failures, or a report that is not OK.
pub fn run(args: DemoArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // rumqttd logs every client disconnect as an error: noise in a demo.
    crate::logging::init(crate::logging::LogFormat::Human, "warn,rumqttd=off");
    let options = DemoOptions {
        dir: args.dir,
        sensors: args.sensors,
        rate: args.rate,
        duration: args.duration,
        outage_at: args.outage_at,
        outage: args.outage,
        images: args.images,
        image_size: usize::try_from(args.image_size)?,
    };
    println!(
        "blindgate demo: {} sensors at {}/s and a camera ({} images) for {:?}; cloud link cut at {:?} for {:?}",
        options.sensors,
        options.rate,
        options.images,
        options.duration,
        options.outage_at,
        options.outage
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(run_demo(options))?;
    println!("{report}");
    if report.ok() {
        Ok(())
    } else {
        Err("the demo lost or duplicated messages (see the report above)".into())
    }
}
