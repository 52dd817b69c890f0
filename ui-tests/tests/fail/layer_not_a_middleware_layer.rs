//! `Builder::layer` takes a tower layer whose service handles a
//! `sourceflow::middleware::Request`; a value of another kind is refused with what to pass.

fn main() {
    let _ = sourceflow::builder().layer(std::time::Duration::from_secs(5));
}
