//! `#[derive(Event)]` and `#[derive(Command)]` for [`cqrs`](https://docs.rs/cqrs).
//!
//! Use them through the `cqrs` crate, which re-exports them; see its documentation for the
//! attributes.

mod attr;
mod check;
mod expand;

use proc_macro::TokenStream;
use syn::{parse_macro_input, DeriveInput};

use attr::Kind;

/// Derives `cqrs::Event`: the event name, topic, schema version and ordering key.
///
/// Container attributes, all optional: `#[event(name = "...", topic = "...", version = N,
/// key = "field", crate = "path")]`; field attribute: `#[event(key)]`.
#[proc_macro_derive(Event, attributes(event))]
pub fn derive_event(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand::derive(&input, Kind::Event).into()
}

/// Derives `cqrs::Command`, with the same attributes as `Event` under `#[command(...)]`.
#[proc_macro_derive(Command, attributes(command))]
pub fn derive_command(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand::derive(&input, Kind::Command).into()
}
