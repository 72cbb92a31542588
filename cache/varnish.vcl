vcl 4.1;
# Varnish in front of one or several dynimg backends.
#
#   varnishd -a :80 -f /etc/varnish/dynimg.vcl -s malloc,1G
#
# Edit the backend lines below: one per dynimg host. Requests are spread
# round-robin over the healthy ones; a failed fetch is retried on the next.

import directors;
import std;

probe dynimg_health {
    .url = "/images/_health";
    .interval = 2s;
    .timeout = 1s;
    .window = 3;
    .threshold = 2;
}

backend dynimg1 {
    .host = "127.0.0.1";
    .port = "8001";
    .probe = dynimg_health;
    .connect_timeout = 1s;
    .first_byte_timeout = 60s;
}

backend dynimg2 {
    .host = "127.0.0.1";
    .port = "8002";
    .probe = dynimg_health;
    .connect_timeout = 1s;
    .first_byte_timeout = 60s;
}

sub vcl_init {
    new dynimg = directors.round_robin();
    dynimg.add_backend(dynimg1);
    dynimg.add_backend(dynimg2);
}

sub vcl_recv {
    if (req.method != "GET" && req.method != "HEAD") {
        return (pass);
    }
    # The server's own pages (_health, _demo) are never cached.
    if (req.url ~ "^/images/_") {
        return (pass);
    }
    # Only what dynimg reads reaches the cache key, normalised to the values it
    # tells apart, so browsers' differing header strings do not split the cache.
    unset req.http.Cookie;
    unset req.http.Authorization;
    unset req.http.RTT;
    if (req.http.ECT ~ "^(?i)(slow-2g|2g|3g|4g)$") {
        set req.http.ECT = std.tolower(req.http.ECT);
        # dynimg reads Downlink only when no ECT came
        unset req.http.Downlink;
    } else {
        unset req.http.ECT;
    }
    if (req.http.Save-Data ~ "^(?i)on$") {
        set req.http.Save-Data = "on";
    } else {
        unset req.http.Save-Data;
    }
    # "takes AVIF or not" and "takes WebP or not" are all format=auto needs from Accept
    set req.http.X-Dynimg-Accept = "";
    if (req.http.Accept ~ "(?i)image/avif" &&
        req.http.Accept !~ "(?i)image/avif\s*;\s*q=0(\.0*)?\s*(,|$)") {
        set req.http.X-Dynimg-Accept = "image/avif,";
    }
    if (req.http.Accept ~ "(?i)image/webp" &&
        req.http.Accept !~ "(?i)image/webp\s*;\s*q=0(\.0*)?\s*(,|$)") {
        set req.http.X-Dynimg-Accept = req.http.X-Dynimg-Accept + "image/webp";
    }
    if (req.http.X-Dynimg-Accept == "") {
        unset req.http.Accept;
    } else {
        set req.http.Accept = req.http.X-Dynimg-Accept;
    }
    unset req.http.X-Dynimg-Accept;
    return (hash);
}

sub vcl_backend_fetch {
    # chosen per fetch, so a retry goes to the next backend
    set bereq.backend = dynimg.backend();
}

sub vcl_backend_response {
    if (beresp.status >= 500) {
        # a failing backend is not remembered; the last good copy stays in grace
        return (abandon);
    }
    # Serve a stale copy this long when no backend can answer, and keep it for
    # conditional re-fetches (dynimg answers If-None-Match with 304).
    set beresp.grace = 24h;
    set beresp.keep = 24h;
}

sub vcl_backend_error {
    if (bereq.retries < 2) {
        return (retry);
    }
}

sub vcl_deliver {
    if (obj.hits > 0) {
        set resp.http.X-Cache = "hit";
    } else {
        set resp.http.X-Cache = "miss";
    }
}
