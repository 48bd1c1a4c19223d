//! App role plugin: payments. `GET /api/v1/payment/products` lists the
//! catalog, defined server-side in this plugin's `[[plugins.config.products]]`:
//! the price of an order always comes from here, never from the client.

wit_bindgen::generate!({ world: "app-plugin", path: "../../wit" });

use exports::wxhost::plugin::handler::Guest;
use serde::{Deserialize, Serialize};
use serde_json::json;
use wxhost::plugin::config;
use wxhost::plugin::log::{self, Level};
use wxhost::plugin::types::{Request, Response};

struct Payment;

impl Guest for Payment {
    fn handle(req: Request) -> Response {
        match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/api/v1/payment/products") => match catalog() {
                Ok(products) => reply(200, json!({ "products": products })),
                Err(why) => {
                    log::log(Level::Error, &format!("the product catalog in plugins.toml is invalid: {why}"));
                    reply(
                        500,
                        json!({ "error": { "code": "catalog_invalid", "message": "the catalog is not available" } }),
                    )
                }
            },
            _ => reply(404, json!({ "error": { "code": "not_found", "message": "no such route" } })),
        }
    }
}

export!(Payment);

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Product {
    id: String,
    name: String,
    /// Price in fen (1/100 yuan).
    price_fen: i64,
    /// Quota credited when paid.
    credits: i64,
}

/// The catalog, checked: unique ids, positive prices, non-negative credits.
fn catalog() -> Result<Vec<Product>, String> {
    let raw = config::get("products").ok_or("no [[plugins.config.products]]")?;
    let products: Vec<Product> = serde_json::from_str(&raw).map_err(|e| e.to_string())?;
    for (i, p) in products.iter().enumerate() {
        if p.id.is_empty()
            || p.id.len() > 64
            || !p.id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(format!("product {i}: id must be 1-64 letters, digits, _ or -"));
        }
        if p.name.is_empty() || p.price_fen <= 0 || p.credits < 0 {
            return Err(format!("product {}: needs a name, a positive price_fen and credits >= 0", p.id));
        }
        if products[..i].iter().any(|q| q.id == p.id) {
            return Err(format!("product {} is listed twice", p.id));
        }
    }
    Ok(products)
}

fn reply(status: u16, body: serde_json::Value) -> Response {
    Response {
        status,
        headers: vec![("content-type".into(), "application/json; charset=utf-8".into())],
        body: body.to_string().into_bytes(),
    }
}
