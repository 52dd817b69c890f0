//! `#[handler]`: check the signature of an `async fn`, keep the function as written (so it
//! can be called directly in unit tests), and register a type-erased invoker for it.

use proc_macro2::TokenStream;
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{FnArg, ItemFn, LitStr, PathArguments, ReturnType, Type};

const SHAPE: &str = "a handler looks like `async fn create_order(cmd: CreateOrder, ctx: &Context) -> sourceflow::Result<()>`";

const QUERY_SHAPE: &str = "a handler that returns a value answers a #[query] and looks like `async fn get_order(q: GetOrder, State(db): State<Db>) -> sourceflow::Result<OrderView>`; command and event handlers return `()` or `Result<(), E>`";

const QUERY_ARGUMENTS: &str = "a handler that returns a value answers a #[query], and a query is answered in process, never through a queue: it takes no `queue`, `filter` or queue settings; command and event handlers return `()` or `Result<(), E>`";

enum Extra {
    Context,
    State(Box<Type>),
    /// `&mut Tx<DB>` (or `&mut sqlx::Transaction<'_, DB>`): the database type.
    Tx(Box<Type>),
}

pub fn expand(args: TokenStream, input: TokenStream) -> syn::Result<TokenStream> {
    let mut queue: Option<LitStr> = None;
    let mut filter: Option<LitStr> = None;
    let mut options = crate::options::QueueOptions::default();
    let parser = syn::meta::parser(|meta| {
        let key = meta
            .path
            .get_ident()
            .map(|i| i.to_string())
            .unwrap_or_default();
        if options.parse(&key, &meta)? {
            return Ok(());
        }
        let slot = match key.as_str() {
            "queue" => &mut queue,
            "filter" => &mut filter,
            _ => {
                let given = quote::ToTokens::to_token_stream(&meta.path)
                    .to_string()
                    .replace(' ', "");
                let known: Vec<&str> = ["queue", "filter"]
                    .into_iter()
                    .chain(crate::options::KEYS.iter().copied())
                    .collect();
                let hint = match crate::message::did_you_mean(&given, &known) {
                    Some(k) => format!("did you mean `{k}`? "),
                    None => String::new(),
                };
                return Err(meta.error(format!(
                    "unknown #[handler] argument `{given}`; {hint}an event handler takes \
                     `queue = \"...\"` (its subscriber queue), `filter = \"{{..}}\"` (an SNS \
                     filter policy on message attributes) and queue settings \
                     (`visibility_timeout`, `retention`, `delay`, `max_receive_count`, \
                     `high_throughput`, `sse`, `tags(..)`)"
                )));
            }
        };
        if slot.is_some() {
            return Err(meta.error(format!("`{key}` is given twice")));
        }
        *slot = Some(meta.value()?.parse()?);
        Ok(())
    });
    syn::parse::Parser::parse2(parser, args)?;
    if let Some(q) = &queue {
        let fifo =
            crate::names::check_queue(&q.value()).map_err(|m| syn::Error::new(q.span(), m))?;
        options.check_fifo(Some(fifo))?;
    }
    if let Some(f) = &filter {
        crate::options::check_filter(f)?;
    }
    let options_tokens = options.tokens();
    let filter_tokens = match &filter {
        Some(f) => quote!(::core::option::Option::Some(#f)),
        None => quote!(::core::option::Option::None),
    };

    let func: ItemFn = syn::parse2(input).map_err(|e| {
        syn::Error::new(
            e.span(),
            format!("#[handler] goes on an `async fn`; {SHAPE}"),
        )
    })?;
    let sig = &func.sig;
    if sig.asyncness.is_none() {
        return Err(syn::Error::new_spanned(
            sig.fn_token,
            format!("#[handler] functions must be `async fn`: the listener awaits them; {SHAPE}"),
        ));
    }
    if !sig.generics.params.is_empty() {
        return Err(syn::Error::new_spanned(
            &sig.generics,
            "a handler cannot be generic: it is registered for one concrete message type",
        ));
    }
    if let Some(v) = &sig.variadic {
        return Err(syn::Error::new_spanned(v, "a handler cannot be variadic"));
    }

    let mut inputs = sig.inputs.iter();
    let first = inputs.next().ok_or_else(|| {
        syn::Error::new_spanned(
            &sig.ident,
            format!("a handler takes the message it handles as its first argument; {SHAPE}"),
        )
    })?;
    let msg_ty = match first {
        FnArg::Receiver(r) => {
            return Err(syn::Error::new_spanned(
                r,
                "a handler is a free function, not a method; pass shared state as `State<T>`",
            ))
        }
        FnArg::Typed(pt) => match &*pt.ty {
            Type::Reference(r) => {
                return Err(syn::Error::new_spanned(
                    r,
                    "take the message by value, not by reference: `cmd: CreateOrder`",
                ))
            }
            ty => ty.clone(),
        },
    };

    if returns_value(&sig.output) {
        if queue.is_some() || filter.is_some() || options.any() {
            return Err(syn::Error::new(
                proc_macro2::Span::call_site(),
                QUERY_ARGUMENTS,
            ));
        }
        return expand_query(&func, msg_ty, inputs);
    }

    let mut extras = Vec::new();
    let mut seen_ctx = false;
    let mut seen_tx = false;
    for arg in inputs {
        let FnArg::Typed(pt) = arg else {
            return Err(syn::Error::new_spanned(arg, "unexpected `self`"));
        };
        match classify(&pt.ty) {
            Some(Extra::Context) if seen_ctx => {
                return Err(syn::Error::new_spanned(
                    &pt.ty,
                    "`&Context` is taken twice; one is enough",
                ))
            }
            Some(Extra::Context) => {
                seen_ctx = true;
                extras.push(Extra::Context);
            }
            Some(Extra::Tx(_)) if seen_tx => {
                return Err(syn::Error::new_spanned(
                    &pt.ty,
                    "the transaction is taken twice; a handler runs in one transaction",
                ))
            }
            Some(Extra::Tx(db)) => {
                seen_tx = true;
                extras.push(Extra::Tx(db));
            }
            Some(state) => extras.push(state),
            None if names_tx(&pt.ty) => {
                return Err(syn::Error::new_spanned(
                    &pt.ty,
                    "take the transaction by mutable reference, `tx: &mut Tx<Postgres>` or \
                     `tx: &mut Tx<Sqlite>`: the listener commits it once the handler has returned",
                ))
            }
            None if names_context(&pt.ty) => {
                return Err(syn::Error::new_spanned(
                    &pt.ty,
                    "take the context by shared reference: `ctx: &Context`",
                ))
            }
            None => {
                return Err(syn::Error::new_spanned(
                    &pt.ty,
                    format!(
                        "a handler takes one message, then only `&Context`, `State<T>` and \
                         `&mut Tx<DB>` arguments; {SHAPE}"
                    ),
                ))
            }
        }
    }

    let fn_name = &sig.ident;
    let fn_name_str = fn_name.to_string();
    let mut lets = Vec::new();
    let mut call_args = vec![quote!(__message)];
    let mut states = Vec::new();
    let mut gives = Vec::new();
    let mut tx_kind = quote!(::core::option::Option::None);
    for (i, extra) in extras.iter().enumerate() {
        match extra {
            Extra::Context => call_args.push(quote!(__ctx)),
            Extra::Tx(db) => {
                lets.push(quote_spanned! {db.span()=>
                    let mut __tx = ::sourceflow::__private::take_tx::<#db>(__ctx)?;
                });
                gives.push(quote! {
                    ::sourceflow::__private::give_tx::<#db>(__ctx, __tx);
                });
                tx_kind = quote_spanned! {db.span()=>
                    ::core::option::Option::Some(<#db as ::sourceflow::__private::TxDatabase>::KIND)
                };
                call_args.push(quote!(&mut __tx));
            }
            Extra::State(inner) => {
                let var = format_ident!("__state{}", i);
                lets.push(quote_spanned! {inner.span()=>
                    let #var = ::sourceflow::__private::state::<#inner>(__ctx)?;
                });
                states.push(quote!(::sourceflow::__private::StateRequirement::of::<#inner>()));
                call_args.push(quote!(#var));
            }
        }
    }
    let ret_span = match &sig.output {
        ReturnType::Default => sig.paren_token.span.join(),
        ReturnType::Type(_, ty) => ty.span(),
    };
    let into_result = quote_spanned! {ret_span=>
        ::sourceflow::__private::IntoHandlerResult::into_handler_result(__out)
    };
    let queue_tokens = match &queue {
        Some(q) => quote!(::core::option::Option::Some(#q)),
        None => quote!(::core::option::Option::None),
    };
    let decode = quote_spanned! {msg_ty.span()=>
        __ctx.__decode::<#msg_ty>()
    };
    let msg_check = quote_spanned! {msg_ty.span()=>
        ::sourceflow::__private::HandlerRoute::new::<#msg_ty>
    };

    // The invoker is a closure in the registration rather than a fn of its own: both need
    // `#msg_ty: Message`, and within one body rustc reports a type that is not a message once.
    Ok(quote! {
        #func

        ::sourceflow::__private::inventory::submit! {
            #msg_check(
                #fn_name_str,
                ::core::module_path!(),
                ::core::file!(),
                ::core::line!(),
                #queue_tokens,
                &[#(#states),*],
                #options_tokens,
                #filter_tokens,
                |__ctx| {
                    ::std::boxed::Box::pin(async move {
                        let __message: #msg_ty = #decode?;
                        #(#lets)*
                        let __out = #fn_name(#(#call_args),*).await;
                        #(#gives)*
                        #into_result
                    })
                },
            )
            .with_tx(#tx_kind)
        }
    })
}

/// `Context` taken some other way than `&Context` (by value, `&mut`).
fn names_context(ty: &Type) -> bool {
    let ty = match ty {
        Type::Reference(r) => &*r.elem,
        ty => ty,
    };
    matches!(ty, Type::Path(p) if p.path.segments.last().is_some_and(|s| s.ident == "Context"))
}

/// `Tx<..>` or `Transaction<..>` taken some other way than `&mut`.
fn names_tx(ty: &Type) -> bool {
    let ty = match ty {
        Type::Reference(r) => &*r.elem,
        ty => ty,
    };
    matches!(ty, Type::Path(p) if p.path.segments.last().is_some_and(|s| s.ident == "Tx" || s.ident == "Transaction"))
}

/// The database of `Tx<DB>` / `Transaction<'_, DB>`: its last type argument.
fn tx_database(ty: &Type) -> Option<Box<Type>> {
    let Type::Path(p) = ty else { return None };
    let last = p.path.segments.last()?;
    if last.ident != "Tx" && last.ident != "Transaction" {
        return None;
    }
    let PathArguments::AngleBracketed(a) = &last.arguments else {
        return None;
    };
    a.args.iter().rev().find_map(|arg| match arg {
        syn::GenericArgument::Type(t) => Some(Box::new(t.clone())),
        _ => None,
    })
}

fn classify(ty: &Type) -> Option<Extra> {
    match ty {
        Type::Reference(r) if r.mutability.is_none() => match &*r.elem {
            Type::Path(p) if p.path.segments.last()?.ident == "Context" => Some(Extra::Context),
            _ => None,
        },
        Type::Reference(r) => tx_database(&r.elem).map(Extra::Tx),
        Type::Path(p) => {
            let last = p.path.segments.last()?;
            if last.ident != "State" {
                return None;
            }
            match &last.arguments {
                PathArguments::AngleBracketed(a) if a.args.len() == 1 => match a.args.first()? {
                    syn::GenericArgument::Type(t) => Some(Extra::State(Box::new(t.clone()))),
                    _ => None,
                },
                _ => None,
            }
        }
        _ => None,
    }
}

/// True when the return type carries a value: the function answers a query. `()`,
/// `Result<(), E>` (and any alias written `X<()>`) are what message handlers return.
fn returns_value(output: &ReturnType) -> bool {
    let ReturnType::Type(_, ty) = output else {
        return false;
    };
    let is_unit = |t: &Type| matches!(t, Type::Tuple(t) if t.elems.is_empty());
    match &**ty {
        t if is_unit(t) => false,
        Type::Never(_) => false,
        Type::Path(p) => {
            let Some(last) = p.path.segments.last() else {
                return true;
            };
            match &last.arguments {
                PathArguments::AngleBracketed(a) => !matches!(
                    a.args.first(),
                    Some(syn::GenericArgument::Type(t)) if is_unit(t)
                ),
                _ => true,
            }
        }
        _ => true,
    }
}

/// A query handler: the query, then `State<T>` arguments only; returns `Result<Response, E>`.
fn expand_query<'a>(
    func: &ItemFn,
    query_ty: Type,
    inputs: impl Iterator<Item = &'a FnArg>,
) -> syn::Result<TokenStream> {
    let sig = &func.sig;
    let mut lets = Vec::new();
    let mut call_args = vec![quote!(__query)];
    let mut states = Vec::new();
    for (i, arg) in inputs.enumerate() {
        let FnArg::Typed(pt) = arg else {
            return Err(syn::Error::new_spanned(arg, "unexpected `self`"));
        };
        match classify(&pt.ty) {
            Some(Extra::State(inner)) => {
                let var = format_ident!("__state{}", i);
                lets.push(quote_spanned! {inner.span()=>
                    let #var = ::sourceflow::__private::query_state::<#inner>(&__scope)?;
                });
                states.push(quote!(::sourceflow::__private::StateRequirement::of::<#inner>()));
                call_args.push(quote!(#var));
            }
            Some(Extra::Context) | None if names_context(&pt.ty) => {
                return Err(syn::Error::new_spanned(
                    &pt.ty,
                    format!(
                        "a query handler takes no `&Context`: a query is answered in process, \
                         outside any message, so there is no message to describe; take the \
                         query and `State<T>` arguments only. ({QUERY_SHAPE})"
                    ),
                ))
            }
            Some(Extra::Tx(_)) | None if names_tx(&pt.ty) => {
                return Err(syn::Error::new_spanned(
                    &pt.ty,
                    format!(
                        "a query handler takes no transaction: a query only reads, outside \
                         any message; take the query and `State<T>` arguments only (a pool \
                         in a `State<T>` reads the database). ({QUERY_SHAPE})"
                    ),
                ))
            }
            _ => {
                return Err(syn::Error::new_spanned(
                    &pt.ty,
                    format!("a query handler takes the query, then only `State<T>` arguments; {QUERY_SHAPE}"),
                ))
            }
        }
    }
    let fn_name = &sig.ident;
    let fn_name_str = fn_name.to_string();
    let ret_span = match &sig.output {
        ReturnType::Default => sig.paren_token.span.join(),
        ReturnType::Type(_, ty) => ty.span(),
    };
    let answer = quote_spanned! {ret_span=>
        ::sourceflow::__private::IntoQueryResult::<
            <#query_ty as ::sourceflow::Query>::Response
        >::into_query_result(__out)
    };
    let route = quote_spanned! {query_ty.span()=>
        ::sourceflow::__private::QueryRoute::new::<#query_ty>
    };
    let take = quote_spanned! {query_ty.span()=>
        ::sourceflow::__private::take_query::<#query_ty>(__query)
    };
    Ok(quote! {
        #func

        ::sourceflow::__private::inventory::submit! {
            #route(
                #fn_name_str,
                ::core::module_path!(),
                ::core::file!(),
                ::core::line!(),
                &[#(#states),*],
                |__scope, __query| {
                    ::std::boxed::Box::pin(async move {
                        let __query: #query_ty = #take?;
                        #(#lets)*
                        let __out = #fn_name(#(#call_args),*).await;
                        #answer.map(::sourceflow::__private::box_answer)
                    })
                },
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use super::returns_value;

    #[test]
    fn a_handler_that_returns_a_value_answers_a_query() {
        let value = |s: &str| returns_value(&syn::parse_str(s).expect("a return type"));
        for message in [
            "",
            "-> ()",
            "-> sourceflow::Result<()>",
            "-> Result<(), MyError>",
            "-> anyhow::Result<()>",
            "-> !",
        ] {
            assert!(!value(message), "{message:?} is a message handler's");
        }
        for query in [
            "-> sourceflow::Result<OrderView>",
            "-> Result<Option<OrderView>, MyError>",
            "-> Result<Vec<()>, E>",
            "-> u64",
            "-> QueryResult",
            "-> (u64, u64)",
        ] {
            assert!(value(query), "{query:?} is a query handler's");
        }
    }
}
