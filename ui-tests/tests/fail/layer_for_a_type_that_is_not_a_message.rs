//! `Builder::layer_for::<M>` wraps the handlers of a message type: `M` must be a command or
//! an event.

use sourceflow::middleware::{self, Next, Request};

async fn audit(req: Request, next: Next) -> Result<(), sourceflow::BoxError> {
    next.run(req).await
}

fn main() {
    let _ = sourceflow::builder().layer_for::<String>(middleware::from_fn(audit));
}
