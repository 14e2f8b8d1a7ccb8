using Godot;

namespace NpcdGodot
{
    /// <summary>The project settings of the addon (Project Settings, section "npcd").</summary>
    public static class NpcdSettings
    {
        public const string Address = "npcd/connection/address";
        public const string InitialBackoffMs = "npcd/connection/initial_backoff_ms";
        public const string MaxBackoffMs = "npcd/connection/max_backoff_ms";

        public static void Register()
        {
            Add(Address, "127.0.0.1:50051", Variant.Type.String);
            Add(InitialBackoffMs, 250, Variant.Type.Int);
            Add(MaxBackoffMs, 5000, Variant.Type.Int);
        }

        private static void Add(string name, Variant value, Variant.Type type)
        {
            if (!ProjectSettings.HasSetting(name)) ProjectSettings.SetSetting(name, value);
            ProjectSettings.SetInitialValue(name, value);
            ProjectSettings.AddPropertyInfo(new Godot.Collections.Dictionary
            {
                { "name", name },
                { "type", (int)type },
            });
        }
    }
}
