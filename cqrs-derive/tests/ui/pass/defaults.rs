use cqrs::{Command, Event};

#[derive(Event, serde::Serialize, serde::Deserialize)]
struct BookingConfirmed {
    booking_id: String,
}

#[derive(Event, serde::Serialize, serde::Deserialize)]
struct Heartbeat;

#[derive(Command, serde::Serialize, serde::Deserialize)]
struct BookTicket(u32);

fn main() {
    assert_eq!(<BookingConfirmed as cqrs::Event>::NAME, "BookingConfirmed");
    assert_eq!(<BookingConfirmed as cqrs::Event>::TOPIC, None);
    assert_eq!(<BookingConfirmed as cqrs::Event>::VERSION, 1);
    assert_eq!(cqrs::Event::key(&BookingConfirmed { booking_id: "b".into() }), None);
    assert_eq!(<Heartbeat as cqrs::Event>::NAME, "Heartbeat");
    assert_eq!(<BookTicket as cqrs::Command>::NAME, "BookTicket");
}
