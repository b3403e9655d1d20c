//! `test-apiserver`: serve the test apiserver on a port, write its kubeconfig, and run until
//! SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use test_apiserver::{ControllerMode, DEFAULT_TOKEN, Options, TestApiServer, WorkloadSeed};

/// A faithful test Kubernetes apiserver for Deployments and StatefulSets.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// Where to write a kubeconfig for this server.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The bearer token clients must present.
    #[arg(long, default_value = DEFAULT_TOKEN)]
    token: String,
    /// A Deployment to create, as NAMESPACE/NAME=REPLICAS (repeatable).
    #[arg(long = "deployment", value_name = "NAMESPACE/NAME=REPLICAS")]
    deployments: Vec<WorkloadSeed>,
    /// A StatefulSet to create, as NAMESPACE/NAME=REPLICAS (repeatable).
    #[arg(long = "statefulset", value_name = "NAMESPACE/NAME=REPLICAS")]
    statefulsets: Vec<WorkloadSeed>,
    /// How long new pods take to become ready (and old ones to terminate).
    #[arg(long, default_value_t = 2000)]
    ready_after_ms: u64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let server = TestApiServer::start_with(Options {
        listen: args.listen,
        token: args.token,
        controller: ControllerMode::Ready { after: Duration::from_millis(args.ready_after_ms) },
    })
    .await?;
    for seed in &args.deployments {
        server.add_deployment(&seed.namespace, &seed.name, seed.replicas);
    }
    for seed in &args.statefulsets {
        server.add_statefulset(&seed.namespace, &seed.name, seed.replicas);
    }
    if let Some(path) = &args.kubeconfig {
        let partial = path.with_extension("partial");
        server.write_kubeconfig(&partial)?;
        std::fs::rename(&partial, path)?;
        tracing::info!(path = %path.display(), "kubeconfig written");
    }
    tracing::info!(url = %server.url(), "serving until SIGINT or SIGTERM");
    shutdown_signal().await?;
    tracing::info!("shutting down");
    server.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() -> std::io::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result,
        _ = terminate.recv() => Ok(()),
    }
}
