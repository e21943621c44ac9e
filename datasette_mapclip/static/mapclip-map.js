// A map's page: the deep-zoom viewer (OpenSeadragon, served from this plugin's own static files)
// over the image's IIIF service, or over the map's own image file served by this site (a local
// folder load: OpenSeadragon's simple image source).  The page names a service's info.json only
// when its host is one the publisher allows (the iiif_hosts setting); tiles come from the host
// that info.json names in its "id", so the info.json is read here first and the viewer opens it
// only when that host is allowed too.
document.addEventListener("DOMContentLoaded", function () {
  var element = document.getElementById("mapclip-zoom");
  if (!element || typeof OpenSeadragon === "undefined") {
    return;
  }
  if (element.dataset.imageUrl) {
    openViewer(element, {type: "image", url: element.dataset.imageUrl},
               "The map's image could not be read: see the full image link below.");
    return;
  }
  var hosts = [];
  try {
    hosts = JSON.parse(element.dataset.iiifHosts || "[]");
  } catch (error) {
    hosts = [];
  }
  var defaultPorts = {"http:": "80", "https:": "443"};

  // The same rule as iiif.host_allowed: "example.org" allows it and its subdomains on any port,
  // "example.org:8182" that host on that port only.
  function allowed(url) {
    var parsed;
    try {
      parsed = new URL(url, window.location.href);
    } catch (error) {
      return false;
    }
    if (!(parsed.protocol in defaultPorts) || !parsed.hostname) {
      return false;
    }
    var host = parsed.hostname.toLowerCase();
    var port = parsed.port && parsed.port !== defaultPorts[parsed.protocol] ? parsed.port : "";
    var hostPort = port ? host + ":" + port : host;
    return hosts.some(function (entry) {
      entry = String(entry).trim().toLowerCase().replace(/\.$/, "");
      if (!entry) {
        return false;
      }
      if (entry.indexOf(":") >= 0) {
        return hostPort === entry;
      }
      return host === entry || host.slice(-(entry.length + 1)) === "." + entry;
    });
  }

  var infoUrl = element.dataset.infoUrl;
  if (!allowed(infoUrl)) {
    failed(element, "This image service is not one this site allows: see the full image link below.", "refused");
    return;
  }
  fetch(infoUrl, {credentials: "omit"}).then(function (response) {
    if (!response.ok) {
      throw new Error("info.json answered " + response.status);
    }
    return response.json();
  }).then(function (info) {
    var tiles = info && (info.id || info["@id"]);
    if (typeof tiles !== "string" || !allowed(tiles)) {
      failed(element, "The image service sends its tiles from a host this site does not allow: see the full image link below.",
             "refused");
      return;
    }
    openViewer(element, info, "The image service did not answer: see the full image link below.");
  }).catch(function () {
    failed(element, "The image service did not answer: see the full image link below.");
  });
});

function failed(element, message, state) {
  element.dataset.state = state || "failed";
  var note = document.createElement("p");
  note.className = "mapclip-zoom-failed";
  note.textContent = message;
  element.appendChild(note);
}

function openViewer(element, tileSources, failure) {
  var viewer = OpenSeadragon({
    element: element,
    prefixUrl: element.dataset.prefixUrl,
    tileSources: tileSources,
    showNavigator: true,
    navigatorPosition: "BOTTOM_RIGHT",
    maxZoomPixelRatio: 2,
    crossOriginPolicy: false
  });
  viewer.addHandler("open", function () {
    element.dataset.state = "open";
    outlineWords(viewer);
  });
  viewer.addHandler("open-failed", function () {
    failed(element, failure);
  });
  viewer.addHandler("tile-loaded", function () { element.dataset.tiles = String(Number(element.dataset.tiles || 0) + 1); });
  window.mapclipViewer = viewer;
}

// The words OCR read, outlined over the map (boxes normalised to the image); ?word=ID zooms to one.
function outlineWords(viewer) {
  var list = document.getElementById("mapclip-words");
  var item = viewer.world.getItemAt(0);
  if (!list || !item) return;
  var words;
  try { words = JSON.parse(list.dataset.words || "[]"); } catch (error) { return; }
  var size = item.getContentSize();
  var aspect = size.x ? size.y / size.x : 1;
  var wanted = Number(new URLSearchParams(window.location.search).get("word"));
  words.forEach(function (word) {
    var box = document.createElement("div");
    box.className = "mapclip-word-box" + (word.id === wanted ? " mapclip-word-match" : "");
    box.title = String(word.text);  // text, never markup
    var rect = new OpenSeadragon.Rect(word.x, word.y * aspect, word.w, word.h * aspect);
    viewer.addOverlay({element: box, location: rect});
    if (word.id === wanted) {
      viewer.viewport.fitBounds(new OpenSeadragon.Rect(rect.x - rect.width, rect.y - 4 * rect.height,
                                                       rect.width * 3, rect.height * 9), true);
    }
  });
  list.dataset.outlined = String(words.length);
}
