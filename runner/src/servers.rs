//! grad's address: one URL, or several grad replicas' URLs separated by
//! commas (`--server http://a:7070,http://b:7070`), tried in turn. A
//! Service in front of the replicas is one URL; the local backend hands
//! its runners every live replica's URL, its own first, so that a runner
//! whose replica died reconnects to another.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use tonic::{
    body::Body,
    codegen::{Service, http},
    transport::{Channel, Endpoint},
};

/// A URL that is not one, and why.
#[derive(Debug)]
pub struct BadUrl {
    pub url: String,
    pub reason: String,
}

pub struct Servers {
    urls: Vec<String>,
    endpoints: Vec<Endpoint>,
    current: Arc<AtomicUsize>,
}

impl Servers {
    /// Parses the comma-separated `list`, each endpoint set up by `setup`.
    pub fn parse(list: &str, setup: impl Fn(Endpoint) -> Endpoint) -> Result<Servers, BadUrl> {
        let mut urls = Vec::new();
        let mut endpoints = Vec::new();
        for url in list.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            let endpoint = Endpoint::from_shared(url.to_string()).map_err(|e| BadUrl {
                url: url.to_string(),
                reason: e.to_string(),
            })?;
            urls.push(url.to_string());
            endpoints.push(setup(endpoint));
        }
        if endpoints.is_empty() {
            return Err(BadUrl {
                url: list.to_string(),
                reason: "no URL given".into(),
            });
        }
        Ok(Servers {
            urls,
            endpoints,
            current: Arc::default(),
        })
    }

    /// The grad to try now: its index, URL and endpoint.
    pub fn current(&self) -> (usize, &str, &Endpoint) {
        let i = self.current.load(Ordering::Relaxed) % self.endpoints.len();
        (i, &self.urls[i], &self.endpoints[i])
    }

    /// Grad `index` could not be reached: move on to the next, unless
    /// someone did already.
    pub fn failed(&self, index: usize) {
        move_on(&self.current, index, self.endpoints.len());
    }

    /// One channel over all of them: each call goes to the current grad,
    /// and a call that cannot reach it moves on to the next for the calls
    /// after it. Connections are made when first used.
    pub fn channel(&self) -> GradChannel {
        GradChannel {
            channels: self
                .endpoints
                .iter()
                .map(|e| e.clone().connect_lazy())
                .collect(),
            current: self.current.clone(),
        }
    }
}

fn move_on(current: &AtomicUsize, index: usize, n: usize) {
    let _ = current.compare_exchange(index, (index + 1) % n, Ordering::Relaxed, Ordering::Relaxed);
}

/// A channel to grad: to one of several replicas (see [`Servers::channel`]),
/// or to one grad connection.
#[derive(Clone)]
pub struct GradChannel {
    channels: Arc<[Channel]>,
    current: Arc<AtomicUsize>,
}

impl From<Channel> for GradChannel {
    fn from(channel: Channel) -> GradChannel {
        GradChannel {
            channels: Arc::new([channel]),
            current: Arc::default(),
        }
    }
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<Body>, tonic::transport::Error>> + Send>>;

impl Service<http::Request<Body>> for GradChannel {
    type Response = http::Response<Body>;
    type Error = tonic::transport::Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Each call readies the channel it picks.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let n = self.channels.len();
        let index = self.current.load(Ordering::Relaxed) % n;
        let mut channel = self.channels[index].clone();
        let current = self.current.clone();
        Box::pin(async move {
            let answered = match std::future::poll_fn(|cx| channel.poll_ready(cx)).await {
                Ok(()) => channel.call(request).await,
                Err(e) => Err(e),
            };
            // Only a transport failure is an error here (a gRPC error is
            // a response): this grad is unreachable.
            if answered.is_err() {
                move_on(&current, index, n);
            }
            answered
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_is_tried_in_turn_and_a_failure_moves_on_once() {
        let servers = Servers::parse("http://a:1, http://b:2,,http://c:3", |e| e).unwrap();
        assert_eq!(servers.current().1, "http://a:1");
        servers.failed(0);
        assert_eq!(servers.current().1, "http://b:2");
        // A second failure report for the grad already left changes nothing.
        servers.failed(0);
        assert_eq!(servers.current().1, "http://b:2");
        servers.failed(1);
        servers.failed(2);
        assert_eq!(servers.current().1, "http://a:1");
    }

    #[test]
    fn a_bad_url_is_named() {
        let err = Servers::parse("http://a:1,not a url", |e| e)
            .err()
            .expect("refused");
        assert_eq!(err.url, "not a url");
        assert!(Servers::parse("", |e| e).is_err());
    }
}
