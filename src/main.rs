//! The `nexus` binary: parses the subcommand and calls the library. One image serves every pod.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use nexus::app::{self, Mode};
use nexus::config::Config;
use nexus::events::Registry;
use nexus::replay;
use nexus::topology;

// glibc's allocator spent a quarter of a busy worker's CPU in malloc/free and consolidation
// (perf, webhook fan-out); mimalloc's per-thread free lists cost a fraction of that.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "nexus",
    version,
    about = "Event-driven digital-channels hub",
    propagate_version = true
)]
struct Cli {
    /// Configuration file (TOML); layered over the built-in defaults, under NEXUS_* env.
    #[arg(long, global = true, env = "NEXUS_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every role in one process on the embedded bus: nothing else to install.
    Dev {
        /// Where the embedded bus and stores keep their data [default: `stores.data_dir`,
        /// .nexus].
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// HTTP address [default: `http.listen`, 127.0.0.1:8080].
        #[arg(long)]
        listen: Option<String>,
    },
    /// The HTTP/WebSocket edge only (bus and stores from config).
    Edge,
    /// Worker roles (names from the topology), as one consumer group member each.
    Worker {
        /// Roles to run, e.g. `conversation history`.
        #[arg(required = true)]
        roles: Vec<String>,
    },
    /// Topics and roles on the bus.
    Topology {
        #[command(subcommand)]
        command: TopologyCommand,
    },
    /// Moves a consumer group to an offset or time, or copies a range to another topic.
    Replay(ReplayArgs),
    /// The Avro event schemas.
    Schemas {
        #[command(subcommand)]
        command: SchemasCommand,
    },
    /// The configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Args)]
struct BusArg {
    /// Bus URL (overrides bus.url): embedded://DIR, kafka://H:P[,H:P], nats://H:P.
    #[arg(long)]
    bus: Option<String>,
    /// Topology file (overrides topology.file).
    #[arg(long)]
    topology: Option<PathBuf>,
}

#[derive(Args)]
struct PlanArgs {
    #[command(flatten)]
    bus: BusArg,
    /// Exit 2 when apply would create or update a topic, 0 when the bus matches (as
    /// `terraform plan -detailed-exitcode`). Errors and conflicts exit 1 either way.
    #[arg(long)]
    detailed_exitcode: bool,
}

/// Exit code of `topology plan --detailed-exitcode` when apply has something to do.
const PLAN_HAS_CHANGES: i32 = 2;

#[derive(Subcommand)]
enum TopologyCommand {
    /// Prints what `apply` would change; exits 1 when a topic conflicts (apply would refuse).
    Plan(PlanArgs),
    /// Creates or updates topics; running it twice changes nothing the second time.
    Apply(BusArg),
    /// Writes the AsyncAPI 3.0 document of topics, event schemas and roles.
    Asyncapi {
        /// Topology file (overrides topology.file).
        #[arg(long)]
        topology: Option<PathBuf>,
        /// Output file; stdout if absent.
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("from").required(true).args(["from_offset", "from_time"])))]
#[command(group(clap::ArgGroup::new("mode").required(true).args(["dry_run", "execute"])))]
struct ReplayArgs {
    /// Bus URL (overrides bus.url).
    #[arg(long)]
    bus: Option<String>,
    /// Topic to replay.
    #[arg(long)]
    topic: String,
    /// Consumer group to move (not with --copy-to, which moves no group).
    #[arg(long, required_unless_present = "copy_to", conflicts_with = "copy_to")]
    group: Option<String>,
    /// Start at this offset in every selected partition (clamped to what the log keeps).
    #[arg(long)]
    from_offset: Option<u64>,
    /// Start at the first event at or after this time (RFC 3339).
    #[arg(long)]
    from_time: Option<String>,
    /// With --copy-to: stop before this time (RFC 3339).
    #[arg(long)]
    to_time: Option<String>,
    /// Only this partition.
    #[arg(long)]
    partition: Option<u32>,
    /// Print per partition what would happen; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Do it.
    #[arg(long)]
    execute: bool,
    /// Move the group even while it has active members.
    #[arg(long, conflicts_with = "copy_to")]
    force: bool,
    /// Copy the range to this topic instead of moving a group (e.g. a DLQ back to its topic).
    #[arg(long)]
    copy_to: Option<String>,
}

#[derive(Subcommand)]
enum SchemasCommand {
    /// Fails if a schema version is not backward compatible with the previous one, or a
    /// released version was edited.
    Check {
        /// Check this schemas directory on disk instead of the copy built into the binary.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Prints the fingerprint lock of the built-in schemas, or with --dir writes
    /// `<dir>/fingerprints.lock` (refused while anything but a new version is wrong).
    Lock {
        /// Schemas directory whose lock file to write.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Loads and validates the config; prints the effective config with secrets redacted.
    Check,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let mut config = Config::load(cli.config.as_deref()).context("invalid configuration")?;
    nexus::telemetry::init_tracing(&config.telemetry);
    nexus::memory::disable_transparent_huge_pages();
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Dev { data_dir, listen } => {
                // The flags win over the config (file and env), which wins over the defaults.
                if let Some(dir) = data_dir {
                    config.stores.data_dir = dir.display().to_string();
                }
                if let Some(listen) = listen {
                    config.http.listen = listen;
                }
                config.bus.url = format!("embedded://{}", config.data_dir().join("bus").display());
                config.validate().context("invalid configuration")?;
                serve(config, Mode::Dev).await
            }
            Command::Edge => serve(config, Mode::Edge).await,
            Command::Worker { roles } => serve(config, Mode::Worker(roles)).await,
            Command::Topology { command } => run_topology(config, command).await,
            Command::Replay(args) => run_replay(config, args).await,
            Command::Schemas { command } => run_schemas(command),
            Command::Config {
                command: ConfigCommand::Check,
            } => {
                print!("{}", config.redacted_toml());
                eprintln!("config ok");
                Ok(())
            }
        }
    })
}

async fn serve(config: Config, mode: Mode) -> Result<()> {
    let shutdown = CancellationToken::new();
    app::cancel_on_signal(shutdown.clone());
    app::run(Arc::new(config), mode, shutdown)
        .await
        .context("nexus stopped with an error")
}

fn with_bus(
    mut config: Config,
    bus: &Option<String>,
    topology: &Option<PathBuf>,
) -> Result<Config> {
    if let Some(url) = bus {
        config.bus.url = url.clone();
    }
    if let Some(path) = topology {
        config.topology.file = path.display().to_string();
    }
    config.validate().context("invalid configuration")?;
    Ok(config)
}

async fn run_topology(config: Config, command: TopologyCommand) -> Result<()> {
    match command {
        TopologyCommand::Plan(PlanArgs {
            bus: args,
            detailed_exitcode,
        }) => {
            let config = with_bus(config, &args.bus, &args.topology)?;
            let topology = app::load_topology(&config)?;
            // A plan only reads: an embedded directory without a bus is not created (a typo
            // would leave an empty bus behind). It is planned as the empty bus apply would
            // create, with a warning naming the directory, so plan-then-apply still works.
            let plan = match replay::connect_existing(&config.bus).await {
                Ok(bus) => topology::plan(bus.as_ref(), &topology).await?,
                Err(e @ replay::ReplayError::NoEmbeddedBus(_)) => {
                    eprintln!("warning: {e}");
                    eprintln!("warning: planned against an empty bus: apply would create it");
                    topology::Plan {
                        topics: topology
                            .topic_specs()
                            .into_iter()
                            .map(|spec| topology::TopicPlan {
                                spec,
                                current: None,
                                change: topology::Change::Create,
                            })
                            .collect(),
                        undeclared: Ok(Vec::new()),
                        applied: false,
                    }
                }
                Err(e) => return Err(e).context("cannot connect to the bus"),
            };
            println!("{plan}");
            // A plan that apply would refuse is a failure for a script, not a success.
            if plan.conflicts() > 0 {
                bail!(
                    "{} topic(s) in conflict: apply would refuse (see the `!` lines)",
                    plan.conflicts()
                );
            }
            // Topics on the bus the file does not declare are listed but are no change:
            // apply cannot act on them (it never deletes a topic), so a script waiting for
            // "nothing to apply" must not wait on them.
            if detailed_exitcode && plan.has_changes() {
                use std::io::Write;
                std::io::stdout().flush().context("cannot write the plan")?;
                std::process::exit(PLAN_HAS_CHANGES);
            }
            Ok(())
        }
        TopologyCommand::Apply(args) => {
            let config = with_bus(config, &args.bus, &args.topology)?;
            let topology = app::load_topology(&config)?;
            let bus = nexus::bus::connect(&config.bus)
                .await
                .context("cannot connect to the bus")?;
            let plan = topology::apply(bus.as_ref(), &topology).await?;
            println!("{plan}");
            Ok(())
        }
        TopologyCommand::Asyncapi {
            topology: file,
            out,
        } => {
            let config = with_bus(config, &None, &file)?;
            let topology = app::load_topology(&config)?;
            let doc = topology::asyncapi::render(&topology, Registry::builtin());
            match out {
                Some(path) => std::fs::write(&path, doc)
                    .with_context(|| format!("cannot write {}", path.display()))?,
                None => print!("{doc}"),
            }
            Ok(())
        }
    }
}

fn parse_time(flag: &str, value: &str) -> Result<i64> {
    chrono::DateTime::parse_from_rfc3339(value)
        .map(|t| t.timestamp_millis())
        .with_context(|| {
            format!("{flag} `{value}` is not an RFC 3339 time (e.g. 2026-11-25T10:00:00Z)")
        })
}

async fn run_replay(config: Config, args: ReplayArgs) -> Result<()> {
    let config = with_bus(config, &args.bus, &None)?;
    let from = match (args.from_offset, &args.from_time) {
        (Some(o), None) => replay::ReplayFrom::Offset(o),
        (None, Some(t)) => replay::ReplayFrom::Time(parse_time("--from-time", t)?),
        _ => bail!("give exactly one of --from-offset and --from-time"),
    };
    let to_time = args
        .to_time
        .as_deref()
        .map(|t| parse_time("--to-time", t))
        .transpose()?;
    let bus = replay::connect_existing(&config.bus)
        .await
        .context("cannot connect to the bus")?;
    if let Some(dest) = &args.copy_to {
        let request = replay::CopyRequest {
            from_topic: args.topic.clone(),
            to_topic: dest.clone(),
            from,
            to_time,
            partition: args.partition,
        };
        let report = replay::copy(bus.as_ref(), &request, args.dry_run).await?;
        print!("{report}");
        return Ok(());
    }
    let Some(group) = args.group else {
        bail!("--group is required unless --copy-to is given")
    };
    if to_time.is_some() {
        bail!("--to-time only applies with --copy-to: a consumer group cannot stop at a time");
    }
    let request = replay::ReplayRequest {
        topic: args.topic,
        group,
        from,
        to_time,
        partition: args.partition,
    };
    let plan = if args.execute {
        replay::execute(bus.as_ref(), &request, args.force).await?
    } else {
        replay::plan(bus.as_ref(), &request).await?
    };
    print!("{plan}");
    Ok(())
}

fn run_schemas(command: SchemasCommand) -> Result<()> {
    match command {
        SchemasCommand::Check { dir } => {
            let report = match dir {
                Some(dir) => Registry::check_dir(&dir),
                None => Registry::builtin().check(),
            };
            match report {
                Ok(report) => {
                    print!("{report}");
                    Ok(())
                }
                Err(errors) => {
                    for e in &errors {
                        eprintln!("error: {e}");
                    }
                    bail!("{} schema problem(s)", errors.len())
                }
            }
        }
        SchemasCommand::Lock { dir: None } => {
            print!("{}", Registry::builtin().lock_file());
            Ok(())
        }
        SchemasCommand::Lock { dir: Some(dir) } => match Registry::write_lock(&dir) {
            Ok(path) => {
                println!("wrote {}", path.display());
                Ok(())
            }
            Err(errors) => {
                for e in &errors {
                    eprintln!("error: {e}");
                }
                bail!("lock not written: {} schema problem(s)", errors.len())
            }
        },
    }
}
