"""Datasette's permissions hold through every route of the plugin: a collection the actor may not
view is invisible (not listed, not searchable, no thumbnails), and the plugin changes nothing that
Datasette decides for other databases."""

from __future__ import annotations

import pytest

from conftest import DATASETTE_1, load_collection, make_datasette, public_secret_plain

ROOT = {"id": "root"}


@pytest.fixture(scope="module")
def collections(tmp_path_factory, model_args):
    db_path, _ = load_collection(tmp_path_factory, model_args, 8)
    return public_secret_plain(db_path, tmp_path_factory.mktemp("perm"))


def datasette(collections, metadata):
    public, secret, plain = collections
    return make_datasette([str(public), str(secret), str(plain)], metadata=metadata)


def cookies(ds, actor):
    return {"ds_actor": ds.sign({"a": actor}, "actor")} if actor else {}


PRIVATE_DATABASE = {"databases": {"secret": {"allow": ROOT}}}
PRIVATE_TABLE = {"databases": {"secret": {"tables": {"maps": {"allow": ROOT}}}}}


@pytest.mark.asyncio
@pytest.mark.parametrize("metadata", [PRIVATE_DATABASE, PRIVATE_TABLE], ids=["private-database", "private-table"])
async def test_a_private_collection_is_invisible_to_anonymous_visitors(collections, metadata):
    ds = datasette(collections, metadata)
    anonymous = {}
    for path in ("/-/mapclip/search.json?like=1&k=3&_db=secret", "/-/mapclip/search.json?q=relief&_db=secret",
                 "/-/mapclip?like=1&_db=secret", "/-/mapclip/thumbnail/secret/1.jpg"):
        response = await ds.client.get(path, cookies=anonymous)
        assert response.status_code == 403, (path, response.status_code, response.text[:200])
        assert "relief" not in response.text.lower() or "forbidden" in response.text.lower()
    json_403 = await ds.client.get("/-/mapclip/search.json?like=1&_db=secret")
    assert json_403.json()["ok"] is False and "Forbidden" in json_403.json()["error"]
    upload = await ds.client.post("/-/mapclip/search.json?_db=secret", content=b"x",
                                  headers={"content-type": "multipart/form-data; boundary=zz"})
    assert upload.status_code == 403  # refused before the body is read
    page = await ds.client.get("/-/mapclip")
    assert page.status_code == 200
    assert "secret" not in page.text  # not in the collection menu
    default = (await ds.client.get("/-/mapclip/search.json?like=1&k=3")).json()
    assert default["ok"] and default["database"] == "maps"  # the first collection this visitor may view
    assert "secret" not in (await ds.client.get("/-/mapclip/search.json?like=1&_db=nope")).json()["error"]
    # Datasette's own answers are unchanged: the private one stays private, the public one public.
    assert (await ds.client.get("/secret/maps.json")).status_code == 403
    assert (await ds.client.get("/maps/maps.json")).status_code == 200
    assert (await ds.client.get("/maps")).status_code == 200


@pytest.mark.asyncio
@pytest.mark.parametrize("metadata", [PRIVATE_DATABASE, PRIVATE_TABLE], ids=["private-database", "private-table"])
async def test_a_permitted_actor_searches_the_private_collection(collections, metadata):
    ds = datasette(collections, metadata)
    root = cookies(ds, ROOT)
    data = (await ds.client.get("/-/mapclip/search.json?like=1&k=3&_db=secret", cookies=root)).json()
    assert data["ok"] and data["database"] == "secret" and len(data["results"]) == 3
    thumbnail = await ds.client.get(data["results"][0]["thumbnail_url"], cookies=root)
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
    assert thumbnail.headers["cache-control"].startswith("private")  # never in a shared cache
    page = await ds.client.get("/-/mapclip?_db=secret&like=1", cookies=root)
    assert page.status_code == 200 and "secret" in page.text
    public_thumbnail = await ds.client.get("/-/mapclip/thumbnail/maps/1.jpg")
    assert public_thumbnail.headers["cache-control"].startswith("public")


@pytest.mark.asyncio
async def test_the_menu_offers_map_search_only_where_there_is_something_to_search(collections):
    public, secret, plain = collections
    only_private = make_datasette([str(secret), str(plain)], metadata=PRIVATE_DATABASE)
    assert "/-/mapclip" not in (await only_private.client.get("/")).text
    root = cookies(only_private, ROOT)
    assert "/-/mapclip" in (await only_private.client.get("/", cookies=root)).text
    no_collection = make_datasette([str(plain)])
    assert "/-/mapclip" not in (await no_collection.client.get("/")).text
    assert "/-/mapclip" not in (await no_collection.client.get("/plain")).text


@pytest.mark.asyncio
async def test_an_instance_closed_to_anonymous_visitors_stays_closed(collections):
    ds = datasette(collections, {"allow": ROOT})
    for path in ("/-/mapclip", "/-/mapclip/search.json?like=1", "/-/mapclip/thumbnail/maps/1.jpg"):
        assert (await ds.client.get(path)).status_code == 403, path
    assert (await ds.client.get("/-/mapclip/search.json?like=1", cookies=cookies(ds, ROOT))).status_code == 200


@pytest.mark.asyncio
async def test_hidden_vector_tables_are_added_per_collection_only(collections):
    ds = datasette(collections, PRIVATE_DATABASE)
    await ds.invoke_startup()
    if DATASETTE_1:  # hidden through the configuration (1.0 has no get_metadata hook)
        databases = ds.config["databases"]
        assert "plain" not in databases
        assert all(t["hidden"] for t in databases["maps"]["tables"].values())
        assert any(name.startswith("map_vectors_") for name in databases["maps"]["tables"])
        assert "allow" not in databases["maps"] and databases["secret"]["allow"] == ROOT
        assert "map_vectors" not in "".join(await ds.get_database("plain").hidden_table_names())
    else:
        assert "tables" not in ds.metadata(database="plain")
        assert ds.metadata(database="maps")["tables"]["map_vectors"]["hidden"] is True
        # each collection's metadata is its own: the private database's allow block stays there
        assert "allow" not in ds.metadata(database="maps")
        assert ds.metadata(database="secret")["allow"] == ROOT
    tables = (await ds.client.get("/maps.json")).json()["tables"]
    assert all(t["hidden"] for t in tables if t["name"].startswith("map_vectors"))


SEARCH_ACTION = "Search these maps by image or text"


def maps_table_allow(allow):
    return {"databases": {"secret": {"tables": {"maps": {"allow": allow}}}}}


@pytest.mark.asyncio
@pytest.mark.parametrize("allow, may, may_not", [
    ({"id": "alice"}, [{"id": "alice"}], [None, {"id": "bob"}]),
    (False, [], [None, {"id": "alice"}]),
], ids=["maps-allow-alice", "maps-allow-false"])
async def test_the_database_action_follows_the_maps_table_permission(collections, allow, may, may_not):
    """The database page stays open (view-database is allowed), but the search action is offered
    only to an actor who may view the collection's ``maps`` table."""
    ds = datasette(collections, maps_table_allow(allow))
    link = 'href="/-/mapclip?_db=secret"'
    for actor in may + may_not:
        page = await ds.client.get("/secret", cookies=cookies(ds, actor))
        assert page.status_code == 200, (actor, page.status_code)  # the database itself is visible
        maps_page = await ds.client.get("/secret/maps", cookies=cookies(ds, actor))
        offered = SEARCH_ACTION in page.text
        assert offered == (actor in may), (actor, allow)
        assert (link in page.text) == offered
        # the action agrees with what Datasette itself decides for the table
        assert (maps_page.status_code == 200) == offered, (actor, maps_page.status_code)
    # the public copy offers it to everyone, anonymous visitors included
    public = await ds.client.get("/maps")
    assert SEARCH_ACTION in public.text and 'href="/-/mapclip?_db=maps"' in public.text
