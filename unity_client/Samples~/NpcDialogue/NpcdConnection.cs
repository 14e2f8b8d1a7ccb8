using Npcd;
using UnityEngine;

/// <summary>Owns the one NpcdClient of the game and polls it once per frame, before the
/// NPCs' Update (see the execution order attribute), on the main thread: every line event
/// fires here, never on a native thread.</summary>
[DefaultExecutionOrder(-100)]
public sealed class NpcdConnection : MonoBehaviour
{
    [Tooltip("host:port of the npcd daemon")]
    public string address = "127.0.0.1:50051";

    public static NpcdConnection Instance { get; private set; }
    public NpcdClient Client { get; private set; }

    void Awake()
    {
        if (Instance != null && Instance != this)
        {
            Destroy(gameObject);
            return;
        }
        Instance = this;
        DontDestroyOnLoad(gameObject);
        Client = new NpcdClient(address);
    }

    void Update()
    {
        Client.Poll();
    }

    void OnDestroy()
    {
        if (Instance != this) return;
        Client.Dispose();
        Client = null;
        Instance = null;
    }
}
