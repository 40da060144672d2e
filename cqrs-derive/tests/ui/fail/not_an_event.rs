#[derive(serde::Serialize, serde::Deserialize)]
struct Plain;

async fn publish(bus: cqrs::EventBus) {
    let _ = bus.publish(&Plain).await;
}

fn main() {}
