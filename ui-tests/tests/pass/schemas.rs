// A message type that derives JsonSchema through sourceflow's re-export registers its
// payload schema (no schemars dependency of its own, and with sourceflow's default
// features off); #[sensitive] and #[entity_id] still work beside it, and a type without
// the derive registers none.
use sourceflow::schemars::JsonSchema;

#[sourceflow::command(queue = "orders.fifo", name = "schemas.Place.v1")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, JsonSchema)]
pub struct Place {
    #[entity_id]
    pub order_id: u64,
    #[sensitive(card)]
    pub card: String,
    pub lines: Vec<Line>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, JsonSchema)]
#[schemars(crate = "sourceflow::schemars")]
pub struct Line {
    pub sku: String,
}

#[sourceflow::event(topic = "order-events", name = "schemas.Placed.v1")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, sourceflow::schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Placed {
    pub order_id: u64,
}

#[sourceflow::event(topic = "order-events", name = "schemas.Plain.v1")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Plain {
    pub id: u64,
}

fn main() {
    let schema = |name: &str| {
        sourceflow::registry::message_routes()
            .find(|m| m.name == name)
            .and_then(|m| m.schema)
            .map(|f| f())
    };
    let place = schema("schemas.Place.v1").expect("Place registers a schema");
    assert_eq!(place["properties"]["card"]["type"], "string");
    assert_eq!(place["properties"]["lines"]["items"]["$ref"], "#/definitions/Line");
    let placed = schema("schemas.Placed.v1").expect("Placed registers a schema");
    assert!(placed["properties"].get("orderId").is_some(), "serde attributes are honoured");
    assert!(schema("schemas.Plain.v1").is_none());
}
