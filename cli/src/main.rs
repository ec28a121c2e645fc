//! `livemig`: the thin command-line front end. Logic lives in the engine and bench crates.

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "livemig", version, about = "Live migration of memory pages and disk chunks over RDMA or TCP")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    #[command(flatten)]
    tls: livemig_app::args::TlsArgs,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Live-migrate a running workload to a destination (pre-copy).
    Migrate(livemig_app::precopy::MigrateArgs),
    /// Serve as a migration destination.
    Receive(livemig_app::precopy::ReceiveArgs),
    /// Transfer benchmarks in the spirit of perftest/iperf3.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
    /// Host daemon: serves many concurrent sessions (migrations, benchmarks) on one port.
    Serve(livemig_daemon::ServeArgs),
    /// Disks: a chunked mirror of a base image, served over NBD.
    Disk {
        #[command(subcommand)]
        what: DiskCmd,
    },
    /// Image repository: chunked, versioned images served lazily over NBD, CLONE and COMMIT.
    Image {
        #[command(subcommand)]
        what: ImageCmd,
    },
    /// QEMU: livemig as the carrier of QEMU's migration stream, driven over QMP.
    Qemu {
        #[command(subcommand)]
        what: QemuCmd,
    },
    /// Shared secrets for the handshake.
    Secret {
        #[command(subcommand)]
        what: SecretCmd,
    },
}

#[derive(Debug, Subcommand)]
enum DiskCmd {
    /// Serve a disk over NBD (qemu-nbd style): a plain image, or a lazy mirror of --base.
    Serve(livemig_storage::cli::DiskServeArgs),
    /// Migrate a disk served with `disk serve --control` to a `disk receive` host, live.
    Migrate(livemig_storage::cli::control::DiskMigrateArgs),
    /// Hand a running disk migration over now (for `disk migrate --switchover command`).
    Switchover(livemig_storage::cli::control::DiskControlArgs),
    /// Hand over now and return once the destination serves the disk (or the handover failed).
    Handover(livemig_storage::cli::control::DiskControlArgs),
    /// Cancel a disk migration that has not handed over (the disk stays served here).
    Cancel(livemig_storage::cli::control::DiskControlArgs),
    /// Where a served disk stands: idle, migrating or handed-over.
    Status(livemig_storage::cli::control::DiskControlArgs),
    /// Receive a live disk migration, then serve the disk over NBD from the handover on.
    Receive(livemig_storage::cli::receive::DiskReceiveArgs),
}

#[derive(Debug, Subcommand)]
enum ImageCmd {
    /// Stripe a raw image file into the repository as a new image (version 1).
    Push(livemig_image::cli::PushArgs),
    /// List images (latest versions), or one image's versions.
    Ls(livemig_image::cli::LsArgs),
    /// Serve an image version over NBD, fetching chunks lazily; writes stay local.
    Serve(livemig_image::cli::ServeArgs),
    /// CLONE: a new image sharing all content (of a served disk with --control).
    Clone(livemig_image::cli::CloneArgs),
    /// COMMIT: a disk's local modifications as the next version of its image.
    Commit(livemig_image::cli::CommitArgs),
    /// Write an image version as a raw file.
    Export(livemig_image::cli::ExportArgs),
}

#[derive(Debug, Subcommand)]
enum QemuCmd {
    /// Carry QEMU's migration connections over a livemig session: at the destination
    /// (--listen, --incoming, --dst-qmp) or standalone at the source (--unix, --to).
    Carrier(livemig_qemu::cli::CarrierArgs),
    /// Migrate a QEMU guest through livemig, driving the source QEMU over QMP.
    Migrate(livemig_qemu::cli::QemuMigrateArgs),
    /// One QMP command to a QEMU, its return value printed as JSON (a scripting aid).
    Qmp(livemig_qemu::cli::QmpArgs),
}

#[derive(Debug, Subcommand)]
enum SecretCmd {
    /// Write a fresh random 256-bit secret (hex) to FILE, created with mode 0600; an existing
    /// file is never overwritten. Give the same file to both ends with --secret-file.
    New {
        /// Where to write it.
        file: std::path::PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCmd {
    /// Dirty memory pages (4 KiB default) from a source region into a peer region.
    Pages(livemig_bench::pages::BenchArgs),
    /// Storage chunks (1 MiB default) between file-backed regions.
    Chunks(livemig_bench::pages::BenchArgs),
    /// Latency of an urgent 4 KiB page while a bulk push saturates the link (TCP loopback).
    Urgent(livemig_bench::urgent::UrgentArgs),
}

/// Errors are printed once, as one line with their causes (`error: what: why: …`), without a
/// backtrace; the exit status is 1 (commands with their own statuses exit before this).
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LIVEMIG_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    livemig_app::args::set_tls(cli.tls.settings().map_err(anyhow::Error::msg)?);
    match cli.cmd {
        Cmd::Migrate(a) if !a.disk.is_empty() => livemig_storage::cli::together::run_migrate(&a),
        Cmd::Migrate(a) => livemig_app::precopy::run_migrate(&a),
        Cmd::Receive(a) => livemig_app::precopy::run_receive(&a),
        Cmd::Bench { what: BenchCmd::Pages(a) } => livemig_bench::pages::run(livemig_bench::pages::PAGES, &a),
        Cmd::Bench { what: BenchCmd::Chunks(a) } => livemig_bench::pages::run(livemig_bench::pages::CHUNKS, &a),
        Cmd::Bench { what: BenchCmd::Urgent(a) } => livemig_bench::urgent::run(&a),
        Cmd::Serve(a) => livemig_daemon::run(&a),
        Cmd::Image { what: ImageCmd::Push(a) } => livemig_image::cli::run_push(&a),
        Cmd::Image { what: ImageCmd::Ls(a) } => livemig_image::cli::run_ls(&a),
        Cmd::Image { what: ImageCmd::Serve(a) } => livemig_image::cli::run_serve(&a),
        Cmd::Image { what: ImageCmd::Clone(a) } => livemig_image::cli::run_clone(&a),
        Cmd::Image { what: ImageCmd::Commit(a) } => livemig_image::cli::run_commit(&a),
        Cmd::Image { what: ImageCmd::Export(a) } => livemig_image::cli::run_export(&a),
        Cmd::Qemu { what: QemuCmd::Carrier(a) } => livemig_qemu::cli::run_carrier(&a),
        Cmd::Qemu { what: QemuCmd::Migrate(a) } => livemig_qemu::cli::run_migrate(&a),
        Cmd::Qemu { what: QemuCmd::Qmp(a) } => livemig_qemu::cli::run_qmp(&a),
        Cmd::Disk { what: DiskCmd::Serve(a) } => livemig_storage::cli::run_serve(&a),
        Cmd::Disk { what: DiskCmd::Migrate(a) } => livemig_storage::cli::control::run_migrate(&a),
        Cmd::Disk { what: DiskCmd::Switchover(a) } => {
            livemig_storage::cli::control::run_simple(&a, &livemig_storage::cli::control::Request::Switchover)
        }
        Cmd::Disk { what: DiskCmd::Handover(a) } => {
            livemig_storage::cli::control::run_simple(&a, &livemig_storage::cli::control::Request::Handover)
        }
        Cmd::Disk { what: DiskCmd::Cancel(a) } => {
            livemig_storage::cli::control::run_simple(&a, &livemig_storage::cli::control::Request::Cancel)
        }
        Cmd::Disk { what: DiskCmd::Status(a) } => {
            livemig_storage::cli::control::run_simple(&a, &livemig_storage::cli::control::Request::Status)
        }
        Cmd::Disk { what: DiskCmd::Receive(a) } => livemig_storage::cli::receive::run_receive(&a),
        Cmd::Secret { what: SecretCmd::New { file } } => {
            livemig_transport::auth::Secret::write_new(&file)?;
            eprintln!("wrote a new 256-bit secret to {} (mode 0600)", file.display());
            Ok(())
        }
    }
}
