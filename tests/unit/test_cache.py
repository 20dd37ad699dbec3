"""guildIds / loadingGuildIds: every GUILD_CREATE classified, loading completes exactly once."""

from shardgate.cache import GuildCache, GuildState


def test_initial_load_then_join_then_outage_and_back():
    cache = GuildCache()
    assert cache.on_ready(0, [1, 2, 3]) is False
    assert cache.loading_count(0) == 3
    first = cache.on_guild_create(0, 1)
    assert (first.state, first.shard_loaded) == (GuildState.LOADED, False)
    # guild 2 is in an outage during the initial load: it still counts as arrived
    assert cache.on_guild_delete(0, 2, unavailable=True) is False
    last = cache.on_guild_create(0, 3)
    assert (last.state, last.shard_loaded) == (GuildState.LOADED, True)
    assert cache.is_loading(0) is False
    # the outage ends
    back = cache.on_guild_create(0, 2)
    assert (back.state, back.shard_loaded) == (GuildState.AVAILABLE, False)
    # a guild never seen: the bot joined it
    assert cache.on_guild_create(0, 99).state is GuildState.JOINED
    assert cache.guild_count(0) == 4
    # a repeat of an available guild is only a refresh
    assert cache.on_guild_create(0, 99).state is GuildState.KNOWN


def test_guild_delete_without_unavailable_is_a_removal_not_an_outage():
    cache = GuildCache()
    cache.on_ready(0, [])
    cache.on_guild_create(0, 5)
    cache.on_guild_delete(0, 5, unavailable=False)
    assert cache.guild_count(0) == 0
    assert cache.on_guild_create(0, 5).state is GuildState.JOINED


def test_outage_of_known_guild_keeps_it():
    cache = GuildCache()
    cache.on_ready(1, [7])
    cache.on_guild_create(1, 7)
    cache.on_guild_delete(1, 7, unavailable=True)
    assert cache.guild_count(1) == 1
    assert cache.unavailable_count() == 1
    assert cache.on_guild_create(1, 7).state is GuildState.AVAILABLE


def test_empty_ready_is_loaded_at_once_and_shards_are_independent():
    cache = GuildCache()
    assert cache.on_ready(0, []) is True
    cache.on_ready(1, [10, 11])
    assert cache.on_guild_create(1, 10).shard_loaded is False
    assert cache.loading_count() == 1
    assert cache.on_guild_create(1, 11).shard_loaded is True
    assert cache.loading_count() == 0


def test_new_session_reloads_and_forget_shard_clears():
    cache = GuildCache()
    cache.on_ready(0, [1])
    cache.on_guild_create(0, 1)
    cache.on_ready(0, [1, 2])  # re-identify: both must arrive again
    assert cache.on_guild_create(0, 1).state is GuildState.LOADED
    assert cache.on_guild_create(0, 2).shard_loaded is True
    cache.forget_shard(0)
    assert cache.guild_count() == 0
    assert cache.loading_count() == 0
