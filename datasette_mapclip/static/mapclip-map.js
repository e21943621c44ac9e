// A map's page: the deep-zoom viewer over the image's IIIF service (OpenSeadragon, served from
// this plugin's own static files).
document.addEventListener("DOMContentLoaded", function () {
  var element = document.getElementById("mapclip-zoom");
  if (!element || typeof OpenSeadragon === "undefined") {
    return;
  }
  var viewer = OpenSeadragon({
    element: element,
    prefixUrl: element.dataset.prefixUrl,
    tileSources: element.dataset.infoUrl,
    showNavigator: true,
    navigatorPosition: "BOTTOM_RIGHT",
    maxZoomPixelRatio: 2,
    crossOriginPolicy: false
  });
  viewer.addHandler("open", function () { element.dataset.state = "open"; });
  viewer.addHandler("open-failed", function () {
    element.dataset.state = "failed";
    element.insertAdjacentHTML("beforeend", '<p class="mapclip-zoom-failed">The image service did not answer: see the full image link below.</p>');
  });
  viewer.addHandler("tile-loaded", function () { element.dataset.tiles = String(Number(element.dataset.tiles || 0) + 1); });
  window.mapclipViewer = viewer;
});
