#[derive(cqrs::Event)]
#[event(version = "2")]
struct Booked;

#[derive(cqrs::Event)]
#[event(name = 5)]
struct Named;

#[derive(cqrs::Event)]
struct Field {
    #[event(id)]
    id: u32,
}

fn main() {}
