// One error at the attribute; the type still counts as an event, so using it adds none.
#[derive(cqrs::Event)]
#[event(colour = "red")]
struct Booked;

fn name<E: cqrs::Event>() -> &'static str {
    E::NAME
}

fn main() {
    let _ = name::<Booked>();
}
