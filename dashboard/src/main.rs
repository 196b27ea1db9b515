//! chunkwise-dashboard: a small web server that shows pg_chunkwise's tasks, runs,
//! failures and workers as one role sees them, live, and (when allowed) steers them.

mod app;
mod chart;
mod cli;
mod db;
mod guard;
mod live;
mod pages;
mod routes;
mod views;

use std::sync::Arc;

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = cli::Args::parse();
    let app = match app::App::new(&args) {
        Ok(app) => Arc::new(app),
        Err(message) => {
            eprintln!("chunkwise-dashboard: {message}");
            return std::process::ExitCode::from(2);
        }
    };
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!(
                "chunkwise-dashboard: cannot listen on {}: {error}",
                args.listen
            );
            return std::process::ExitCode::from(2);
        }
    };
    let address = listener
        .local_addr()
        .expect("a bound socket has an address");
    // The first line of output says where to go (tests and scripts read it).
    println!(
        "chunkwise-dashboard listening on http://{address}{}/",
        app.prefix
    );
    if !address.ip().is_loopback() && app.token.is_none() {
        eprintln!("chunkwise-dashboard: WARNING: listening beyond this machine without --token");
    }
    // Open event streams never end, so a graceful drain would wait for ever: a signal
    // ends the process at once (there is nothing to save).
    tokio::select! {
        served = axum::serve(listener, routes::router(app)) => match served {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("chunkwise-dashboard: {error}");
                std::process::ExitCode::FAILURE
            }
        },
        () = shutdown() => std::process::ExitCode::SUCCESS,
    }
}

/// SIGINT or SIGTERM.
async fn shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
