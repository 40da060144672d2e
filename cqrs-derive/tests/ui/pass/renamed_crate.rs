extern crate cqrs as messaging;

mod inner {
    #[derive(messaging::Event)]
    #[event(crate = "messaging")]
    pub struct Renamed;
}

fn main() {
    assert_eq!(<inner::Renamed as messaging::Event>::NAME, "Renamed");
}
