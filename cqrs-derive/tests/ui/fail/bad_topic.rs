#[derive(cqrs::Event)]
#[event(topic = "tickets/booked")]
struct Booked;

#[derive(cqrs::Event)]
#[event(name = "booking confirmed")]
struct Confirmed;

#[derive(cqrs::Command)]
#[command(topic = "")]
struct Book;

fn main() {}
