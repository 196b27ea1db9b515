//! Client tests against a real PostgreSQL cluster started by the harness: what the
//! background workers do can only be seen from outside the calling transaction.

mod fixtures;
mod harness;

mod bad_input;
mod cycles;
mod engine;
mod operating;
mod planning;
mod ranges;
mod regress;
mod security;
