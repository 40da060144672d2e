use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, cqrs::Event)]
#[event(name = "orders.OrderPlaced", version = 3)]
struct PlacedV3 {
    id: u32,
}

// The previous type must have a lower version.
#[derive(Serialize, Deserialize, cqrs::Event)]
#[event(name = "orders.OrderPlaced", version = 2, upcast_from = "PlacedV3")]
struct Placed {
    id: u32,
}

impl From<PlacedV3> for Placed {
    fn from(v: PlacedV3) -> Self {
        Placed { id: v.id }
    }
}

fn main() {}
