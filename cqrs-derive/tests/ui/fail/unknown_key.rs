#[derive(cqrs::Event)]
#[event(nmae = "tickets.Booked")]
struct Booked;

fn main() {}
