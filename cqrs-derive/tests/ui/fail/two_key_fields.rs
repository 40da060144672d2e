#[derive(cqrs::Event)]
struct Booked {
    #[event(key)]
    id: u32,
    #[event(key)]
    other: u32,
}

#[derive(cqrs::Event)]
#[event(key = "id")]
struct KeyTwice {
    #[event(key)]
    id: u32,
}

#[derive(cqrs::Event)]
#[event(key = "missing")]
struct NoSuchField {
    id: u32,
}

fn main() {}
