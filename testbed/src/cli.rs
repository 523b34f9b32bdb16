//! The command line of the lab's binary, `ephemerald-testbed`: the demo, the
//! benchmark harness and a containerd testbed by hand. The agent's own
//! command line (`ephemerald run`) is `ephemerald::config`; nothing here
//! reaches the agent.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// ephemerald-testbed: the demo, the benchmark harness and the containerd
/// testbed of ephemerald (each needs root).
#[derive(Debug, Parser)]
#[command(name = "ephemerald-testbed", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start containerd, a local API server and the agent, add a debug
    /// container to a pod and show what happened (needs root).
    Demo(DemoArgs),
    /// Start or stop the project's containerd testbed by hand (needs root).
    Testbed(TestbedArgs),
    /// Measure the agent binary on the testbed (needs root): print a table
    /// and write the results as JSON.
    Bench(BenchArgs),
    /// Two agent binaries side by side on the scale run (fake CRI, no root
    /// needed): size, start → ready and memory, with ratios.
    Compare(CompareArgs),
}

/// `ephemerald-testbed demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// End with one JSON object on a line of its own.
    #[arg(long)]
    pub json: bool,

    /// Working directory for containerd, logs and images.
    #[arg(long, default_value = ".testbed/demo")]
    pub dir: PathBuf,
}

/// `ephemerald-testbed testbed`.
#[derive(Debug, Clone, Args)]
pub struct TestbedArgs {
    /// up: start containerd in the background and import the images;
    /// down: tear it down.
    #[arg(value_parser = ["up", "down"])]
    pub action: String,

    /// Directory of the testbed.
    #[arg(long, default_value = ".testbed/manual")]
    pub dir: PathBuf,

    /// Give pods their own network through a CNI bridge.
    #[arg(long)]
    pub cni: bool,
}

/// `ephemerald-testbed bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Rounds of each side-by-side comparison.
    #[arg(long, default_value_t = 21)]
    pub rounds: usize,

    /// Where the JSON results go.
    #[arg(long, default_value = "bench/results.json")]
    pub out: PathBuf,

    /// A small run of every section (tiny counts; numbers not meaningful).
    #[arg(long)]
    pub quick: bool,

    /// The agent binary to measure (default: `ephemerald` next to this
    /// executable).
    #[arg(long)]
    pub agent_bin: Option<PathBuf>,

    /// Working directory (agent logs, the fake CRI's socket).
    #[arg(long, default_value = ".testbed/bench")]
    pub dir: PathBuf,
}

/// `ephemerald-testbed compare`.
#[derive(Debug, Clone, Args)]
pub struct CompareArgs {
    /// The first agent binary (A, e.g. main's).
    pub a: PathBuf,

    /// The second agent binary (B, e.g. a branch's).
    pub b: PathBuf,

    /// Pods bound to the node, one scale run per count and binary a round.
    #[arg(long, value_delimiter = ',', default_values_t = [20, 1000])]
    pub pods: Vec<usize>,

    /// Rounds (each runs both binaries, in alternating order).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,

    /// Working directory (agent logs, the fake CRI's socket).
    #[arg(long, default_value = ".testbed/compare")]
    pub dir: PathBuf,
}
