#[derive(cqrs::Event)]
enum Booked {
    A,
}

#[derive(cqrs::Command)]
union Raw {
    a: u32,
}

fn main() {}
