//! `#[query(response = T)]`: implement `sourceflow::Query` for a request type. Queries are
//! answered in process, so nothing is registered for the type itself: only its handler is.

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned};
use syn::{DeriveInput, LitStr, Type};

const SHAPE: &str = "write `#[query(response = OrderView)]`";

#[derive(Default)]
struct Args {
    response: Option<Type>,
    name: Option<LitStr>,
}

fn parse_args(args: TokenStream) -> syn::Result<Args> {
    let mut out = Args::default();
    let parser = syn::meta::parser(|meta| {
        let key = meta
            .path
            .get_ident()
            .map(|i| i.to_string())
            .unwrap_or_default();
        match key.as_str() {
            "response" if out.response.is_some() => {
                Err(meta.error("`response` is given twice; keep one"))
            }
            "response" => {
                out.response = Some(meta.value()?.parse()?);
                Ok(())
            }
            "name" if out.name.is_some() => Err(meta.error("`name` is given twice; keep one")),
            "name" => {
                out.name = Some(meta.value()?.parse()?);
                Ok(())
            }
            "queue" | "topic" => Err(meta.error(
                "a query is answered in process by its handler, never through a queue or a \
                 topic; remove the argument (or make this type a #[command] or an #[event])",
            )),
            _ => {
                let given = quote::ToTokens::to_token_stream(&meta.path)
                    .to_string()
                    .replace(' ', "");
                let hint = match crate::message::did_you_mean(&given, &["response", "name"]) {
                    Some(k) => format!("did you mean `{k}`? "),
                    None => String::new(),
                };
                Err(meta.error(format!(
                    "unknown #[query] argument `{given}`; {hint}expected `response = Type` \
                     and optionally `name = \"...\"`"
                )))
            }
        }
    });
    syn::parse::Parser::parse2(parser, args)?;
    Ok(out)
}

pub fn expand(args: TokenStream, input: TokenStream) -> syn::Result<TokenStream> {
    let args = parse_args(args)?;
    let item: DeriveInput = syn::parse2(input).map_err(|e| {
        syn::Error::new(
            e.span(),
            "#[query] declares a query type, so it goes on a struct or an enum; to answer \
             it, mark an `async fn` taking it and returning its response with #[handler]",
        )
    })?;
    if !item.generics.params.is_empty() {
        return Err(syn::Error::new_spanned(
            &item.generics,
            "query types cannot be generic: each query type has exactly one handler, \
             registered for one concrete type",
        ));
    }
    let Some(response) = args.response else {
        return Err(syn::Error::new(
            Span::call_site(),
            format!("#[query] needs the type its handler answers with: {SHAPE}"),
        ));
    };
    if matches!(&response, Type::Tuple(t) if t.elems.is_empty()) {
        return Err(syn::Error::new_spanned(
            &response,
            "a query answers with a value; work that answers nothing is a #[command]",
        ));
    }
    let ident = &item.ident;
    let name = match &args.name {
        Some(n) if n.value().trim().is_empty() => {
            return Err(syn::Error::new(
                n.span(),
                "a query's `name` cannot be empty",
            ))
        }
        Some(n) => n.value(),
        None => ident.to_string(),
    };
    // Spanned at the response type: a response that cannot cross tasks is reported there.
    let response_ty = quote_spanned!(syn::spanned::Spanned::span(&response)=> #response);
    Ok(quote! {
        #item

        impl ::sourceflow::Query for #ident {
            type Response = #response_ty;
            const NAME: &'static str = #name;
        }
    })
}
