vcl 4.1;
# Varnish in front of one or several dynimg backends.
#
#   varnishd -a :80 -f /etc/varnish/dynimg.vcl -s malloc,1G
#
# Edit the backend lines below (one per dynimg host, each added to the director
# in vcl_init) and the dynimg_purgers ACL.
#
# Requests are routed by the source image they name, not spread round-robin:
# every variant of one source is rendered on one backend, so that backend's
# result cache holds each of them once and the others never decode that source.
# While a backend is down its sources go to the next backend on the ring (only
# its share moves), and they come back when the probe sees it healthy again. A
# failed fetch is retried on the next backend.
#
# Every cached variant of one source is dropped with a BAN request naming the
# source in either URL form, from an address in dynimg_purgers:
#
#   curl -X BAN http://127.0.0.1/images/photos/cat.jpg
#   curl -X BAN 'http://127.0.0.1/images/?url=https://origin.example/cat.jpg'

import blob;
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

backend dynimg3 {
    .host = "127.0.0.1";
    .port = "8003";
    .probe = dynimg_health;
    .connect_timeout = 1s;
    .first_byte_timeout = 60s;
}

# Who may send BAN: the hosts your purge scripts run on.
acl dynimg_purgers {
    "127.0.0.1";
    "::1";
}

sub vcl_init {
    # A consistent-hashing ring: a backend's place on it comes from its name
    # here, not its address, so every Varnish with this file routes alike and
    # moving a backend to another address moves none of its sources.
    new dynimg = directors.shard();
    dynimg.add_backend(dynimg1);
    dynimg.add_backend(dynimg2);
    dynimg.add_backend(dynimg3);
}

# The source a request names, in X-Dynimg-Source: the path after /images/ (the
# path form), else the name= or url= parameter; percent-escapes decoded and
# written again one way, and a name's empty and "." parts dropped as dynimg drops
# them, so every spelling of one source gives one value. It is the routing key,
# and the mark a BAN matches. Unset when the request names no source.
sub dynimg_source {
    unset req.http.X-Dynimg-Source;
    if (req.url ~ "^/images/[^_?]") {
        set req.http.X-Dynimg-Source = regsub(req.url, "^/images/([^?]*).*$", "\1");
    } elsif (req.url ~ "^/images/?\?(.*&)?(name|url)=[^&]") {
        set req.http.X-Dynimg-Source =
            regsub(req.url, "^[^?]*\?(.*&)?(name|url)=([^&]*).*$", "\3");
        # in a query "+" is a space
        set req.http.X-Dynimg-Source = regsuball(req.http.X-Dynimg-Source, "\+", "%20");
    } else {
        return;
    }
    # Decoded and encoded again in one step (as RFC 3986 escapes, with no byte
    # ever left raw in a header); a stray "%" is kept as it came, escaped.
    if (req.http.X-Dynimg-Source ~ "^([^%]|%[0-9A-Fa-f]{2})*$") {
        set req.http.X-Dynimg-Source = blob.transcode(decoding=URL, encoding=URL,
            case=UPPER, encoded=req.http.X-Dynimg-Source);
    } else {
        set req.http.X-Dynimg-Source = blob.transcode(encoding=URL, case=UPPER,
            encoded=req.http.X-Dynimg-Source);
    }
    if (req.url !~ "[?&]url=") {
        # a name's slashes are now %2F: "a//./b.jpg" and "/a/b.jpg" are "a/b.jpg"
        set req.http.X-Dynimg-Source = regsuball("%2F" + req.http.X-Dynimg-Source + "%2F",
            "%2F(\.?%2F)+", "%2F");
        set req.http.X-Dynimg-Source = regsub(req.http.X-Dynimg-Source,
            "^%2F(.*?)(%2F)?$", "\1");
    }
    if (req.http.X-Dynimg-Source == "") {
        unset req.http.X-Dynimg-Source;
    }
}

sub vcl_recv {
    call dynimg_source;
    if (req.method == "BAN") {
        if (client.ip !~ dynimg_purgers) {
            return (synth(403, "Forbidden"));
        }
        if (!req.http.X-Dynimg-Source) {
            return (synth(400, "Name the source: BAN /images/NAME, ?name=NAME or ?url=URL"));
        }
        # On a header of the stored object, not on req.url: one ban covers both
        # URL forms and every parameter, and the ban lurker can drop the objects
        # in the background instead of leaving each to its next lookup.
        if (std.ban("obj.http.X-Dynimg-Source == " + req.http.X-Dynimg-Source)) {
            return (synth(200, "Banned " + req.http.X-Dynimg-Source));
        }
        return (synth(400, std.ban_error()));
    }
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
    # Chosen per fetch, by the source (or, for the server's pages, the URL).
    # alt=bereq.retries: a retry goes to the next healthy backend on this key's
    # ring, the one the source moves to once the probe marks its owner sick, so
    # in the seconds before the probe notices, its renders still land on one host.
    if (bereq.http.X-Dynimg-Source) {
        set bereq.backend = dynimg.backend(by=KEY,
            key=dynimg.key(bereq.http.X-Dynimg-Source), alt=bereq.retries, healthy=ALL);
    } else {
        set bereq.backend = dynimg.backend(by=URL, alt=bereq.retries, healthy=ALL);
    }
}

sub vcl_backend_response {
    # the mark a BAN matches (dynimg ignores the request header)
    set beresp.http.X-Dynimg-Source = bereq.http.X-Dynimg-Source;
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

sub vcl_synth {
    # a BAN's answer is one line of text, not Varnish's error page
    if (req.method == "BAN") {
        set resp.http.Content-Type = "text/plain; charset=utf-8";
        set resp.body = resp.reason + {"
"};
        return (deliver);
    }
}

sub vcl_deliver {
    unset resp.http.X-Dynimg-Source;
    if (obj.hits > 0) {
        set resp.http.X-Cache = "hit";
    } else {
        set resp.http.X-Cache = "miss";
    }
}
