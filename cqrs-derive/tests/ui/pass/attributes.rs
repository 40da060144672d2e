use cqrs::{Command, Event};

#[derive(Event, serde::Serialize, serde::Deserialize)]
#[event(name = "tickets.BookingConfirmed", topic = "tickets", version = 2)]
struct BookingConfirmed {
    #[event(key)]
    booking_id: u64,
    seats: u32,
}

#[derive(Event, serde::Serialize, serde::Deserialize)]
#[event(key = "device")]
#[event(topic = "telemetry")]
struct PacketCounterError {
    device: String,
}

#[derive(Event, serde::Serialize, serde::Deserialize)]
struct Tuple(#[event(key)] String, u8);

#[derive(Command, serde::Serialize, serde::Deserialize)]
#[command(name = "tickets.Book", key = "0")]
struct Book(u32);

#[derive(Event)]
struct Generic<T: std::fmt::Display + Send + Sync + 'static> {
    #[event(key)]
    id: T,
}

fn main() {
    use cqrs::Event as _;
    assert_eq!(BookingConfirmed::NAME, "tickets.BookingConfirmed");
    assert_eq!(BookingConfirmed::TOPIC, Some("tickets"));
    assert_eq!(BookingConfirmed::VERSION, 2);
    let e = BookingConfirmed { booking_id: 42, seats: 1 };
    assert_eq!(e.key().as_deref(), Some("42"));
    assert_eq!(e.seats, 1);
    let p = PacketCounterError { device: "router-1".into() };
    assert_eq!(p.key().as_deref(), Some("router-1"));
    assert_eq!(PacketCounterError::TOPIC, Some("telemetry"));
    assert_eq!(Tuple("k".into(), 1).key().as_deref(), Some("k"));
    assert_eq!(cqrs::Command::key(&Book(7)).as_deref(), Some("7"));
    assert_eq!(<Book as cqrs::Command>::NAME, "tickets.Book");
    assert_eq!(Generic { id: 5u8 }.key().as_deref(), Some("5"));
}
