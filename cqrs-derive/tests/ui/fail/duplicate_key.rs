#[derive(cqrs::Event)]
#[event(topic = "a")]
#[event(topic = "b")]
struct Booked;

fn main() {}
