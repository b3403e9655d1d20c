//! The `matrix-k8s-toggle` command: generate a registration, serve, or check the setup.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use matrix_k8s_toggle::{
    check,
    config::{Config, LogFormat},
    registration::{Registration, parse_server_name},
    service, telemetry,
};

#[derive(Parser)]
#[command(version, about = "Switch Kubernetes workloads on and off from Matrix chat (an appservice)")]
struct Cli {
    /// Optional YAML configuration file (environment variables win over it).
    #[arg(long, env = "CONFIG_PATH", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Write a new appservice registration with fresh random tokens.
    GenerateRegistration {
        /// Where the homeserver reaches us, e.g. http://matrix-k8s-toggle.toggle.svc:9000
        #[arg(long)]
        url: url::Url,
        /// The homeserver's server name, e.g. example.org
        #[arg(long)]
        server_name: String,
        /// The appservice id.
        #[arg(long, default_value = "k8s-toggle")]
        id: String,
        /// Localpart of the bot user.
        #[arg(long, default_value = "toggle")]
        sender_localpart: String,
        /// Output file (standard output when absent).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Run the appservice (the default).
    Serve,
    /// Check the configuration, the registration and the homeserver; non-zero exit on failure.
    Check,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // NB: with more than one rustls backend linked in, none is chosen by default.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match cli.command.unwrap_or(Command::Serve) {
        Command::GenerateRegistration { url, server_name, id, sender_localpart, output } => {
            let server_name = parse_server_name(&server_name).map_err(anyhow::Error::msg)?;
            let registration = Registration::generate(&id, &url, &server_name, &sender_localpart)?;
            let yaml = registration.to_yaml();
            match output {
                Some(path) => {
                    write_private(&path, &yaml).with_context(|| format!("writing {}", path.display()))?;
                    eprintln!(
                        "wrote {}; give it to the homeserver (app_service_config_files) and to the bridge (REGISTRATION_PATH)",
                        path.display()
                    );
                }
                None => print!("{yaml}"),
            }
            Ok(())
        }
        Command::Serve => {
            let config = Config::from_env(cli.config.as_deref()).context("invalid configuration")?;
            telemetry::init(&config.log_filter, config.log_format);
            runtime()?.block_on(service::run(config, service::shutdown_signal()))?;
            Ok(())
        }
        Command::Check => {
            telemetry::init("warn", LogFormat::Text);
            let lines = runtime()?.block_on(check::run(cli.config.as_deref()));
            for line in &lines {
                println!("{line}");
            }
            if lines.iter().any(|l| l.result.is_err()) {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")
}

/// Writes `text` to `path`, readable by the owner only (it holds tokens).
fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(text.as_bytes())
}
