use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, cqrs::Event)]
#[event(name = "orders.OrderPlaced", version = 2)]
struct PlacedV2 {
    id: u32,
}

// No version: the default, 1, is not above the previous type's.
#[derive(Serialize, Deserialize, cqrs::Event)]
#[event(name = "orders.OrderPlaced", upcast_from = "PlacedV2")]
struct PlacedNoVersion {
    id: u32,
}

// Commands have no upcasting.
#[derive(Serialize, Deserialize, cqrs::Command)]
#[command(version = 2, upcast_from = "PlacedV2")]
struct Place {
    id: u32,
}

fn main() {}
