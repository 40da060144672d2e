use cqrs::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
#[event(name = "orders.OrderPlaced", version = 1)]
struct V1 {
    total: f64,
}

#[derive(Serialize, Deserialize, Event)]
#[event(name = "orders.OrderPlaced", version = 2, upcast_from = "V1")]
struct V2 {
    cents: u64,
}

impl From<V1> for V2 {
    fn from(v: V1) -> Self {
        V2 { cents: (v.total * 100.0) as u64 }
    }
}

#[derive(Serialize, Deserialize, Event)]
#[event(name = "orders.OrderPlaced", version = 4, upcast_from = "V2")]
struct V4 {
    cents: u64,
    currency: String,
}

impl From<V2> for V4 {
    fn from(v: V2) -> Self {
        V4 { cents: v.cents, currency: "EUR".into() }
    }
}

fn main() {
    // 1 goes through 2; 2 directly; 3 has no type in the chain; 4 is the type itself.
    let from_v1 = V4::upcast(1, br#"{"total":2.5}"#).unwrap().unwrap();
    assert_eq!((from_v1.cents, from_v1.currency.as_str()), (250, "EUR"));
    assert_eq!(V4::upcast(2, br#"{"cents":7}"#).unwrap().unwrap().cents, 7);
    assert!(V4::upcast(3, b"{}").is_none());
    assert!(V4::upcast(2, b"not json").unwrap().is_err());
    assert!(V1::upcast(0, b"{}").is_none());
}
